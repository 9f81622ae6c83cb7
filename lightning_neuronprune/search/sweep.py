"""The rank sweep of Algorithm 1 (REDUCEDIMENSION): the grid of p and the sweep of one junction.

For one junction, p goes down from rank(X) over a grid. For every p the kept set is selected, the
consumer re-fitted, the reduced network evaluated (by the cached evaluator of
:mod:`~lightning_neuronprune.search.evaluation`) and its energy modelled. The sweep stops once the
accuracy drop exceeds the threshold, as Algorithm 1 does. The choice among the points is in
:mod:`~lightning_neuronprune.search.pareto`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from lightning_neuronprune.core.fitting import Fit, FitOptions, JunctionFitter
from lightning_neuronprune.core.selection import Method
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.cost.energy import EnergyModel, EnergyReport
from lightning_neuronprune.search.evaluation import (
    CachedEvaluator,
    batch_target,
    degradation,
    metric_direction,
    model_output,
)
from lightning_neuronprune.search.pareto import choose, pareto_front
from lightning_neuronprune.structure.conv import full_width_consumer
from lightning_neuronprune.structure.conv_fit import junction_fitter
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import GatheredLinear, linear_from, replace_module
from lightning_neuronprune.structure.surgery import apply_reduction

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


@contextmanager
def _temporarily_reduced(
    model: nn.Module, junction: Junction, kept: Tensor, W_p: Tensor, b_p: Tensor | None
):
    names = list(junction.modules)
    originals = {n: model.get_submodule(n) for n in names}
    apply_reduction(model, junction, kept, W_p, b_p)
    try:
        yield model
    finally:
        for n, m in originals.items():
            replace_module(model, n, m)


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
        options: the :class:`~lightning_neuronprune.core.fitting.FitOptions`; overrides ``method``,
            ``affine`` and ``ridge``.
        max_accuracy_drop: stop after the first p whose drop exceeds this (``None``: never).
        baseline: ``(metric, energy)`` of the unreduced model, if already known.
        on_point: called with each point as it is evaluated (progress, logging).
        block: grid points evaluated between two reads of the metric.
        fitter: a :class:`~lightning_neuronprune.core.fitting.JunctionFitter` of this junction's
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
        fitter = junction_fitter(model, junction, stats, options)
    grid = [p for p in rank_grid(n, ranks, start=fitter.rank) if p != n]
    fitter.prepare(grid)
    fitter.release()  # the fits need the second moment only

    def measure(fit: Fit, sync: bool) -> tuple[Any, EnergyReport]:
        if junction.kind == "conv":  # reads all n channels, zero weights at the dropped ones
            probe = full_width_consumer(consumer, n, fit.kept, fit.weight, fit.bias)
        else:
            probe = _probe(consumer, fit)
        acc = evaluator(probe, sync=sync)
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
