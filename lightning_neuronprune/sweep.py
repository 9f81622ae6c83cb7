"""The rank sweep of Algorithm 1 (REDUCEDIMENSION) and the choice of configuration.

For one junction, p goes down from rank(X) over a grid. For every p the kept set is selected, the
consumer re-fitted, the reduced network evaluated and its energy modelled. The sweep stops once the
accuracy drop exceeds the threshold, as Algorithm 1 does.

Evaluation is cached: the consumer's inputs on the evaluation set (and any other values that the
rest of the network needs) are computed once by the unchanged front of the network; for each p
only the part from the consumer onward runs. Keeping p features and deleting the producer's other
rows gives the consumer exactly ``x[..., kept]``, because the modules in between act elementwise,
so the cached path evaluates the reduced network exactly. The split uses :mod:`torch.fx`; when the
model cannot be traced, each p runs the whole network (documented fallback, same results).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from lightning_neuronprune.energy import EnergyModel, EnergyReport
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.fitting import Fit, FitOptions, JunctionFitter
from lightning_neuronprune.selection import Method
from lightning_neuronprune.statistics import (
    TARGET_KEYS,
    JunctionStatistics,
    batch_input,
    call_model,
)
from lightning_neuronprune.surgery import (
    GatheredLinear,
    Junction,
    _set,
    _Tracer,
    apply_reduction,
    linear_from,
)

__all__ = [
    "CachedEvaluator",
    "SweepPoint",
    "batch_target",
    "choose",
    "degradation",
    "metric_direction",
    "model_output",
    "pareto_front",
    "rank_grid",
    "sweep_junction",
]

log = logging.getLogger(__name__)

Ranks = str | int | Sequence[int | float] | None

#: The number of grid points of the default ``ranks="auto"`` for wide layers.
AUTO_POINTS = 48

#: Grid points evaluated between two host synchronisations of :func:`sweep_junction`.
SWEEP_BLOCK = 8


def rank_grid(n: int, ranks: Ranks = "auto", *, start: int | None = None) -> list[int]:
    """The descending list of p to evaluate for a layer of n features.

    Args:
        n: the number of features.
        ranks: ``"all"``: every p from ``start`` down to 1 (Algorithm 1). An ``int`` k: every k-th
            p from ``start`` down, always ending at 1. A list of ints: those p. A list of floats
            in (0, 1]: those fractions of n (rounded up). Values above ``start`` are skipped,
            so one list can serve layers of different widths. ``"auto"`` (or ``None``): every p when
            ``start ≤ 64``, else 48 evenly spaced values plus a dense tail under 16 features.
        start: the largest p, normally rank(X); defaults to n.

    Returns:
        Unique values in [1, start], largest first.
    """
    start = n if start is None else max(1, min(start, n))
    if ranks is None or ranks == "auto":
        if start <= 64:
            values = list(range(start, 0, -1))
        else:
            values = [round(v) for v in torch.linspace(start, 1, AUTO_POINTS).tolist()]
            values += list(range(min(16, start), 0, -1))
    elif ranks == "all":
        values = list(range(start, 0, -1))
    elif isinstance(ranks, int) and not isinstance(ranks, bool):
        if ranks < 1:
            raise ValueError(f"`ranks` as a step must be a positive integer, got {ranks!r}")
        values = [*range(start, 0, -ranks), 1]
    elif isinstance(ranks, Sequence) and not isinstance(ranks, str) and len(ranks) > 0:
        values = []
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, (int, float)):
                raise ValueError(f"`ranks` entries must be ints or fractions, got {r!r}")
            if isinstance(r, float):
                if not 0 < r <= 1:
                    raise ValueError(f"`ranks` fractions must lie in (0, 1], got {r!r}")
                r = max(1, math.ceil(r * n))
            if r < 1:
                raise ValueError(f"`ranks` entries must be at least 1, got {r!r}")
            values.append(r)
    else:
        raise ValueError(
            f"`ranks` must be 'auto', 'all', a positive int step, or a non-empty list of ints or "
            f"fractions, got {ranks!r}"
        )
    return sorted({v for v in values if v <= start}, reverse=True)


def batch_target(batch: Any) -> Tensor:
    """The target of a batch: the second element of a tuple/list, or a ``y``/``target``/``label(s)``
    key of a mapping (Hugging Face-style batches carry ``labels``)."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise NeuronEliminationError(
        f"cannot find the target in a batch of type {type(batch).__name__}; pass `target_fn`"
    )


def model_output(output: Any) -> Tensor:
    """The predictions in a model's output, given to the metric.

    A tensor is taken as is; an object with a ``logits`` attribute or key (Hugging Face's
    ``ModelOutput``, a dict) gives its logits; a tuple or list gives its first element.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise NeuronEliminationError(
        f"the model returned {type(output).__name__}; the sweep evaluates a tensor of predictions "
        "(the output itself, its `logits`, or the first element of a tuple); pass `output_fn`"
    )


_logits = model_output


def degradation(baseline: float, value: float, higher_is_better: bool = True) -> float:
    """How much worse ``value`` is than ``baseline``: ``baseline - value`` for a metric where
    higher is better (accuracy), ``value - baseline`` otherwise (a loss, an MSE).

    Example:
        >>> degradation(0.75, 0.5), degradation(0.25, 0.5, higher_is_better=False)
        (0.25, 0.25)
    """
    return baseline - value if higher_is_better else value - baseline


def metric_direction(metric: Any) -> bool:
    """``metric.higher_is_better``, read as ``True`` when the metric leaves it unset."""
    return getattr(metric, "higher_is_better", None) is not False


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _split(model: nn.Module, consumer: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Split ``model`` at ``consumer`` into a prefix that returns the boundary values and a suffix
    that takes them and runs the consumer and everything after it."""
    graph = _Tracer().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == consumer]
    if len(calls) != 1:
        raise NeuronEliminationError(f"{consumer!r} is called {len(calls)} times")
    after: set[torch.fx.Node] = set()
    stack = [calls[0]]
    while stack:
        node = stack.pop()
        if node not in after:
            after.add(node)
            stack.extend(node.users)
    boundary = [
        n for n in graph.nodes
        if n not in after and n.op != "get_attr" and any(u in after for u in n.users)
    ]  # fmt: skip

    prefix = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node in after:
            continue
        env[node] = prefix.node_copy(node, lambda a: env[a])
    prefix.output(tuple(env[b] for b in boundary))

    suffix = torch.fx.Graph()
    senv: dict[torch.fx.Node, torch.fx.Node] = {
        b: suffix.placeholder(f"boundary_{i}") for i, b in enumerate(boundary)
    }
    for node in graph.nodes:
        if node in after or node.op == "get_attr" and any(u in after for u in node.users):
            senv[node] = suffix.node_copy(node, lambda a: senv[a])
    return torch.fx.GraphModule(model, prefix), torch.fx.GraphModule(model, suffix)


class CachedEvaluator:
    """Evaluates a model with a replaced consumer, running only the part from the consumer onward.

    Args:
        model: the network (not modified; the cached suffix shares its modules).
        consumer: the qualified name of the consumer ``nn.Linear``.
        data: evaluation batches.
        metric: a ``torchmetrics.Metric`` taking ``(preds, target)``; it is reset before each use.
        input_fn: maps a batch to the model input (default :func:`batch_input`); the model is
            called through :func:`~lightning_neuronprune.statistics.call_model`.
        target_fn: maps a batch to the target (default :func:`batch_target`).
        output_fn: maps the model output to the metric's predictions (default
            :func:`model_output`).
        device: where to run; defaults to the model's device.
        cache: set to ``False`` to force the uncached fallback (for comparisons).
        transfer: maps each raw batch to the batch the model runs on, before ``input_fn`` and
            ``target_fn`` (e.g. a Trainer's precision ``convert_input`` and ``batch_to_device``).
            Raw batches are kept and transferred when used, as a Trainer does each epoch.
        forward_context: a context-manager factory entered around every forward pass (e.g. the
            precision plugin's ``forward_context``).

    Attributes:
        cached: whether the fx split succeeded and the front is cached.
        higher_is_better: the metric's direction (``metric.higher_is_better``; unset counts as
            higher is better). :meth:`degradation` uses it.
    """

    def __init__(
        self,
        model: nn.Module,
        consumer: str,
        data: Iterable[Any],
        metric: Any,
        *,
        input_fn: Callable[[Any], Any] | None = None,
        target_fn: Callable[[Any], Tensor] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        device: torch.device | str | None = None,
        cache: bool = True,
        transfer: Callable[[Any], Any] | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.model = model
        self.consumer = consumer
        self.metric = metric
        self.higher_is_better = metric_direction(metric)
        self._output = output_fn or model_output
        self.device = torch.device(device) if device is not None else _device_of(model)
        get_input = input_fn or batch_input
        get_target = target_fn or batch_target
        self._context = forward_context or nullcontext
        self._batches: list[Any]
        if transfer is None:
            self._batches = [(get_input(b), get_target(b)) for b in data]
        else:  # transferred (to the device, in the model's dtype) only when used
            self._batches = [_Lazy(b, transfer, get_input, get_target) for b in data]
        if not self._batches:
            raise NeuronEliminationError("the evaluation data is empty")
        self.cached = False
        self._suffix: torch.fx.GraphModule | None = None
        self._boundaries: list[tuple[Any, ...]] = []
        if cache:
            try:
                prefix, suffix = _split(model, consumer)
                boundaries, targets = [], []
                with _evaluating(model), torch.no_grad(), self._context():
                    for x, y in self._batches:
                        boundaries.append(call_model(prefix, _to(x, self.device)))
                        targets.append(_to(y, self.device))
            except Exception as err:  # noqa: BLE001 - any failure falls back to full passes
                log.info("evaluation cache disabled for %r (%s): full forward per p", consumer, err)
            else:
                self._suffix, self._boundaries = suffix, boundaries
                # keep the targets only, on the device: no copies per evaluation
                self._batches = [(None, y) for y in targets]
                self.cached = True

    @torch.no_grad()
    def __call__(
        self,
        replacement: nn.Module | None = None,
        *,
        modules: Mapping[str, nn.Module] | None = None,
        sync: bool = True,
    ) -> float | Tensor:
        """The metric of the network with some modules temporarily replaced.

        Args:
            replacement: the module that stands in for the consumer. It reads the consumer's
                full original input (e.g. a :class:`GatheredLinear` of the kept features).
            modules: more replacements, by qualified name. In the cached mode, only modules
                from the consumer onward can be replaced (see :meth:`replaceable`).
            sync: return a Python float (reads the device). With ``False`` the metric's
                value stays a tensor on the device, so that several evaluations can be queued
                before one read.
        """
        self.metric.reset()
        root: nn.Module = self._suffix if self.cached else self.model  # type: ignore[assignment]
        swaps = dict(modules or {})
        if replacement is not None:
            swaps[self.consumer] = replacement
        originals = {name: root.get_submodule(name) for name in swaps}
        try:
            for name, module in swaps.items():
                _set(root, name, module)
            with _evaluating(self.model), _evaluating(root), self._context():
                for k, (x, y) in enumerate(self._batches):
                    out = (
                        root(*self._boundaries[k])
                        if self.cached
                        else call_model(root, _to(x, self.device))
                    )
                    self.metric.update(self._output(out), _to(y, self.device))
            value = self.metric.compute()
            return float(value) if sync else value
        finally:
            for name, module in originals.items():
                _set(root, name, module)

    def degradation(self, baseline: float, value: float) -> float:
        """The drop of the metric from ``baseline`` to ``value`` (see :func:`degradation`)."""
        return degradation(baseline, value, self.higher_is_better)

    def replaceable(self, name: str) -> bool:
        """Whether module ``name`` runs in the evaluated part (always true when not cached)."""
        if not self.cached:
            return True
        try:
            self._suffix.get_submodule(name)  # type: ignore[union-attr]
        except AttributeError:
            return False
        return True


class _Lazy:
    """A raw batch that unpacks to ``(input, target)`` of its transferred form, on each use."""

    def __init__(
        self, batch: Any, transfer: Callable[[Any], Any], get_input: Callable[[Any], Any],
        get_target: Callable[[Any], Any],
    ) -> None:  # fmt: skip
        self.batch, self.transfer = batch, transfer
        self.get_input, self.get_target = get_input, get_target

    def __iter__(self):  # noqa: ANN204
        moved = self.transfer(self.batch)
        return iter((self.get_input(moved), self.get_target(moved)))


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextmanager
def _evaluating(model: nn.Module):  # noqa: ANN202
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def _temporarily_reduced(
    model: nn.Module, junction: Junction, kept: Tensor, W_p: Tensor, b_p: Tensor | None
):  # noqa: ANN202
    names = [n for n in (junction.producer, junction.batchnorm, junction.consumer) if n]
    originals = {n: model.get_submodule(n) for n in names}
    apply_reduction(model, junction, kept, W_p, b_p)
    try:
        yield model
    finally:
        for n, m in originals.items():
            _set(model, n, m)


@dataclass(frozen=True)
class SweepPoint:
    """One evaluated configuration of one layer.

    Attributes:
        layer: the junction's canonical name (``"fc1"`` or ``"fc1:in"``).
        p: kept features; ``p == n`` with ``kept == range(n)`` is the unreduced baseline.
        n: features before.
        accuracy: the metric on the evaluation data.
        accuracy_drop: the degradation: baseline metric minus this one, or this one minus the
            baseline for a metric whose ``higher_is_better`` is ``False`` (a loss).
        energy: the :class:`EnergyReport` of the reduced network.
        energy_ratio: original total energy / this one.
        memory_ratio: original parameter memory / this one.
        kept: the kept feature indices.
    """

    layer: str
    p: int
    n: int
    accuracy: float
    accuracy_drop: float
    energy: EnergyReport
    energy_ratio: float
    memory_ratio: float
    kept: tuple[int, ...] = field(repr=False, default=())

    def as_dict(self, *, kept: bool = False) -> dict[str, Any]:
        """A flat record of plain values (energies in joules, memory in bits)."""
        out: dict[str, Any] = {
            "layer": self.layer,
            "p": self.p,
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_drop": self.accuracy_drop,
            "energy_ratio": self.energy_ratio,
            "memory_ratio": self.memory_ratio,
            "params": self.energy.weights,
            **{f"energy_{k}": getattr(self.energy, k) for k in _ENERGY_PARTS},
            "memory_params_bits": self.energy.params_bits,
            "memory_total_bits": self.energy.total_bits,
        }
        if kept:
            out["kept"] = list(self.kept)
        return out


_ENERGY_PARTS = ("total", "mac", "sram_weights", "sram_activations", "dram")


def sweep_junction(
    model: nn.Module,
    junction: Junction,
    stats: JunctionStatistics,
    evaluator: CachedEvaluator,
    energy_model: EnergyModel,
    example_input: Any,
    *,
    ranks: Ranks = "auto",
    method: Method = "svd_qr",
    affine: bool = False,
    ridge: float = 0.0,
    options: FitOptions | None = None,
    max_accuracy_drop: float | None = None,
    baseline: tuple[float, EnergyReport] | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
    block: int = SWEEP_BLOCK,
    fitter: JunctionFitter | None = None,
) -> list[SweepPoint]:
    """Algorithm 1 for one junction: evaluate the reduced network for each p of the grid.

    The kept sets of the whole grid are selected at once (one batched factorization for
    ``svd_qr``, one nested order for ``qr``). The grid is then evaluated in blocks of ``block``
    points with no host synchronisation inside a block: the least-squares fits, the probe layers
    and the metrics stay on the device, and the stopping test reads the block's metrics once.
    ``model`` is modified only temporarily (to model each configuration's energy) and is
    restored, also on error.

    Args:
        model: the trained network.
        junction: the junction to reduce.
        stats: statistics of the consumer's input.
        evaluator: a :class:`CachedEvaluator` for this consumer.
        energy_model: prices each configuration.
        example_input: one input for the energy model.
        ranks: the grid (see :func:`rank_grid`); it starts at rank(X).
        method, affine, ridge: the selection and reconstruction options (or ``options``).
        options: the :class:`~lightning_neuronprune.fitting.FitOptions`; overrides ``method``,
            ``affine`` and ``ridge``.
        max_accuracy_drop: stop after the first p whose drop exceeds this (``None``: never).
        baseline: ``(metric, energy)`` of the unreduced model, if already known.
        on_point: called with each point as it is evaluated (progress, logging).
        block: grid points evaluated between two reads of the metric.
        fitter: a :class:`~lightning_neuronprune.fitting.JunctionFitter` of this junction's
            consumer with these options, if already built (it holds the selection work).

    Returns:
        The points, the baseline (p = n) first, then p descending.
    """
    options = options or FitOptions(method=method, affine=affine, ridge=ridge)
    n = junction.num_features
    consumer = model.get_submodule(junction.consumer)
    if baseline is None:
        baseline = (evaluator(), energy_model.estimate(model, example_input))
    base_acc, base_energy = baseline
    points = [
        SweepPoint(junction.layer, n, n, base_acc, 0.0, base_energy, 1.0, 1.0, tuple(range(n)))
    ]
    if on_point is not None:
        on_point(points[0])
    if fitter is None:
        fitter = JunctionFitter(stats, consumer.weight, consumer.bias, options)
    grid = [p for p in rank_grid(n, ranks, start=fitter.rank) if p != n]
    fitter.prepare(grid)
    fitter.release()  # the fits need the second moment only

    def measure(fit: Fit, sync: bool) -> tuple[Any, EnergyReport]:
        acc = evaluator(_probe(consumer, fit), sync=sync)
        with _temporarily_reduced(model, junction, fit.kept, fit.weight, fit.bias) as reduced:
            return acc, energy_model.estimate(reduced, example_input)

    for first in range(0, len(grid), block):
        ps = grid[first : first + block]
        fits = [fitter.fit(p, check=False) for p in ps]
        results = [measure(fit, sync=False) for fit in fits]
        # the one synchronisation of the block: metrics, solver flags and kept sets together
        dev = fits[0].kept.device
        read = torch.cat(
            [
                torch.stack(
                    [torch.as_tensor(a).reshape(()).to(dev, torch.float64) for a, _ in results]
                )
            ]
            + [torch.stack([fit.ok for fit in fits]).double()]
            + [fit.kept.double() for fit in fits]
        ).tolist()
        accs, oks, kept = read[: len(ps)], read[len(ps) : 2 * len(ps)], read[2 * len(ps) :]
        offset = 0
        for k, (p, fit) in enumerate(zip(ps, fits, strict=True)):
            acc, energy = accs[k], results[k][1]
            if not oks[k]:  # singular normal matrix: redo this p with the pseudo-inverse
                fit = fitter.fit(p, check=True)
                acc, energy = measure(fit, sync=True)
            point = SweepPoint(
                layer=junction.layer,
                p=p,
                n=n,
                accuracy=acc,
                accuracy_drop=evaluator.degradation(base_acc, acc),
                energy=energy,
                energy_ratio=base_energy.energy_ratio(energy),
                memory_ratio=base_energy.memory_ratio(energy),
                kept=tuple(int(i) for i in kept[offset : offset + p]),
            )
            offset += p
            points.append(point)
            if on_point is not None:
                on_point(point)
            if max_accuracy_drop is not None and point.accuracy_drop > max_accuracy_drop:
                return points
    return points


def _probe(consumer: nn.Module, fit: Fit) -> nn.Linear:
    """The reduced consumer as it reads the consumer's full original input: a gathered layer
    of the kept features with the re-fitted weights (built without initialisation or copies)."""
    index, source = fit.kept, consumer.in_features
    if isinstance(consumer, GatheredLinear):
        index, source = consumer.index[index], consumer.source_features
    return linear_from(fit.weight, fit.bias, index=index, source_features=source)


def choose(points: Iterable[SweepPoint], max_accuracy_drop: float) -> SweepPoint | None:
    """The lowest-energy point whose accuracy drop is within ``max_accuracy_drop``.

    Ties in energy go to the higher accuracy. Returns ``None`` when no point qualifies.
    """
    ok = [pt for pt in points if pt.accuracy_drop <= max_accuracy_drop]
    if not ok:
        return None
    return min(ok, key=lambda pt: (pt.energy.total, -pt.accuracy))


def pareto_front(points: Iterable[SweepPoint]) -> list[SweepPoint]:
    """The points not dominated in (lower energy, higher accuracy), by increasing energy."""
    front: list[SweepPoint] = []
    for pt in sorted(points, key=lambda q: (q.energy.total, -q.accuracy)):
        if not front or pt.accuracy > front[-1].accuracy:
            front.append(pt)
    return front
