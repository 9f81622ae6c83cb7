"""Junctions found by behaviour: a probe of the model on one real batch.

:mod:`torch.fx` proves a junction on the code, but many real models cannot be traced (Hugging Face
transformers), or use activation modules that no list of types knows (``GELUActivation``,
``NewGELUActivation``, QuickGELU, users' wrappers). The probe proves it on behaviour instead:

1. **Baseline** (one forward pass, shared by every producer): record the input and output of every
   ``nn.Linear`` call and a fingerprint of every module's output.
2. **Reach** (one pass): add ``δ = 1 + |y|`` to every output feature of the producer, while every
   other ``nn.Linear`` returns its baseline output, so a change travels only through the
   parameter-free or per-feature modules that follow the producer, and stops at the next
   ``nn.Linear``. Exactly one ``nn.Linear`` input may change (the consumer), and the network
   output may not (a residual path around the consumer). Modules whose output changed form the
   path; a ``BatchNorm1d`` of n features on it is sliced with the producer, any other module with
   per-feature parameters is refused.
3. **Feature map** (2⌈log₂ n⌉ passes): perturb the features whose index has bit b set, then
   those where it is clear. The consumer's input may change only in the perturbed features. Both
   patterns together pin every producer feature j to consumer feature j: a one-to-one,
   elementwise path. LayerNorm, softmax and attention change other features and are refused.
4. **Narrowing** (one pass): run the network with the producer cut to n - 1 features and the
   consumer's matching column removed. The consumer must then read exactly its baseline input
   without that feature. Reshapes into attention heads and gated products (SwiGLU's
   ``act(gate(x)) * up(x)``) fail here.

Perturbation ``δ = 1 + |y|`` maps every value to a different one of at least 1, so even a neuron
that is dead under a ReLU on the whole batch shows up. Everything is deterministic: no random
numbers, fixed feature patterns.

**Cost:** one shared baseline pass, then per producer of n features at most 2 + 2⌈log₂ n⌉ forward
passes on the probe batch (24 for a 1536-wide FFN); refusals stop early, most after 1 or 2.
Memory: the inputs and outputs of every ``nn.Linear`` call on the probe batch, so keep the batch
small (the callback uses 8 samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.batches import call_model
from lightning_neuronprune.core.runtime import evaluating
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import replace_module
from lightning_neuronprune.structure.surgery import apply_reduction

__all__ = ["JunctionProbe", "ProbeResult"]

#: Relative change (to the largest magnitude of a tensor) below which a value counts as unchanged.
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ProbeResult:
    """A junction found by the probe.

    Attributes:
        producer: the ``nn.Linear`` whose output features were perturbed.
        consumer: the one ``nn.Linear`` whose input they reach.
        batchnorm: a ``BatchNorm1d`` of n features on the path, or ``None``.
        path: the leaf modules between the two, ``"name (Type)"``, in call order.
        passes: the forward passes this producer cost (the shared baseline not counted).
    """

    producer: str
    consumer: str
    batchnorm: str | None
    path: tuple[str, ...]
    passes: int


@dataclass
class _Trace:
    """What one pass recorded: in the baseline, every ``nn.Linear`` call's input and output; in a
    perturbed pass, per call, which input features differ from the baseline (``changed``)."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    changed: dict[str, list[Tensor]] = field(default_factory=dict)
    output: list[Tensor] = field(default_factory=list)
    fingerprints: list[tuple[str, Tensor]] = field(default_factory=list)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif hasattr(value, "to_tuple"):  # transformers' ModelOutput
        yield from _tensors(value.to_tuple())


def _fingerprint(value: Any) -> Tensor:
    parts = [
        torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()])
        for t in _tensors(value)
        if t.is_floating_point()
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _threshold(old: Tensor, tol: float) -> Tensor | float:
    """``tol (max |old| + tol)``: a 0-d float64 tensor on ``old``'s device (no host read), compared
    in ``old``'s dtype as the Python float it replaces was."""
    if not old.numel():
        return tol * tol
    return tol * (old.abs().max().double() + tol)


def _differ(a: Tensor, b: Tensor, tol: float = TOLERANCE) -> Tensor:
    """0-d bool on the device: whether ``a`` differs from ``b`` (see :func:`_differs`)."""
    if a.shape != b.shape:
        return torch.ones((), dtype=torch.bool, device=a.device)
    if not a.is_floating_point():
        return (a != b).any()
    return ((a - b).abs() > _threshold(b, tol)).any()


def _differs(a: Tensor, b: Tensor, tol: float = TOLERANCE) -> bool:
    return bool(_differ(a, b, tol))  # one host read


def _changed_features(new: Tensor, old: Tensor, tol: float = TOLERANCE) -> Tensor:
    """(n,) bool on ``new``'s device: which features (last dimension) of ``new`` differ from
    ``old``."""
    if new.shape != old.shape:
        return torch.ones(new.shape[-1] if new.dim() else 1, dtype=torch.bool, device=new.device)
    diff = (new - old).abs().reshape(-1, old.shape[-1]).amax(0)
    return diff > _threshold(old, tol)


def _host(masks: list[Tensor]) -> list[Tensor]:
    """Bool tensors (on any devices) copied to the host in one read."""
    if not masks:
        return []
    device = next((m.device for m in masks if m.device.type != "cpu"), masks[0].device)
    flat = torch.cat([m.reshape(-1).to(device) for m in masks]).cpu()
    parts = flat.split([m.numel() for m in masks])
    return [h.reshape(m.shape) for h, m in zip(parts, masks, strict=True)]


def _to_host(changed: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
    """The per-call feature masks of a pass, moved to the host in one read."""
    host = iter(_host([m for per_call in changed.values() for m in per_call]))
    return {name: [next(host) for _ in per_call] for name, per_call in changed.items()}


def _perturbed(y: Tensor, features: Tensor) -> Tensor:
    """``y`` with ``1 + |y|`` added to the chosen features (so each value moves by at least 1)."""
    mask = features.to(device=y.device)
    return torch.where(mask, y + 1 + y.abs(), y)


def _bit_patterns(n: int) -> Iterator[Tensor]:
    j = torch.arange(n)
    for b in range(math.ceil(math.log2(n)) if n > 1 else 0):
        bit = (j >> b) & 1 == 1
        yield bit
        yield ~bit


def _indices(mask: Tensor, limit: int = 8) -> str:
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"[{shown}{', ...' if len(idx) > limit else ''}] ({len(idx)} features)"


def _per_feature_state(module: nn.Module, n: int) -> bool:
    state = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(n in t.shape for t in state if t.dim() > 0)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    with evaluating(model), torch.no_grad():
        yield


class JunctionProbe:
    """Finds the consumer of a producer ``nn.Linear`` by its behaviour on one batch.

    Args:
        model: the network; it is run in ``eval()`` mode under ``torch.no_grad()``, and left
            unchanged (modes restored, hooks removed, also on error).
        example: one model input (see :func:`~lightning_neuronprune.core.batches.batch_input`),
            already on the model's device. A few samples are enough.
        call: runs the model on ``example`` (default
            :func:`~lightning_neuronprune.core.batches.call_model`).
        tolerance: relative change below which a value counts as unchanged.

    The baseline pass runs at construction; :meth:`find` probes one producer.
    """

    def __init__(
        self,
        model: nn.Module,
        example: Any,
        *,
        call: Callable[[nn.Module, Any], Any] | None = None,
        tolerance: float = TOLERANCE,
    ) -> None:
        self.model = model
        self.example = example
        self.call = call or call_model
        self.tolerance = tolerance
        self.passes = 0
        self.baseline = self._run(fingerprints=True)

    def _linears(self) -> dict[str, nn.Linear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}

    def _run(
        self,
        producer: str | None = None,
        features: Tensor | None = None,
        *,
        fingerprints: bool = False,
    ) -> _Trace:
        """One forward pass. With ``producer``, its ``features`` are perturbed and every other
        ``nn.Linear`` call returns its baseline output."""
        trace = _Trace()
        clamp = producer is not None

        def linear_hook(name: str) -> Callable[..., Any]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
                if not clamp:  # the baseline keeps copies
                    trace.inputs.setdefault(name, []).append(args[0].detach().clone())
                    trace.outputs.setdefault(name, []).append(output.detach().clone())
                    return None
                k = len(trace.changed.setdefault(name, []))
                old_in = self.baseline.inputs.get(name, [])
                trace.changed[name].append(  # on the device; read once after the pass
                    _changed_features(args[0], old_in[k], self.tolerance)
                    if k < len(old_in)
                    else torch.zeros(0, dtype=torch.bool, device=args[0].device)
                )
                if name == producer:
                    return _perturbed(output, features)  # type: ignore[arg-type]
                old = self.baseline.outputs.get(name, [])
                if k < len(old) and old[k].shape == output.shape:
                    # a copy: an in-place module after this layer (LeakyReLU(inplace=True))
                    # would otherwise rewrite the stored baseline for every later pass
                    return old[k].clone()
                return None

            return hook

        def module_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                trace.fingerprints.append((name, _fingerprint(output)))

            return hook

        handles = []
        try:
            for name, m in self.model.named_modules():
                if isinstance(m, nn.Linear):
                    handles.append(m.register_forward_hook(linear_hook(name)))
                elif fingerprints:
                    handles.append(m.register_forward_hook(module_hook(name)))
            with _evaluating(self.model):
                out = self.call(self.model, self.example)
            trace.output = [t.detach().clone() for t in _tensors(out)]
            trace.changed = _to_host(trace.changed)
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        return trace

    def find(self, producer: str) -> ProbeResult:
        """The consumer of ``producer``'s output features, or a :class:`JunctionError`.

        Raises:
            JunctionError: the producer does not run exactly once on the batch; its features
                reach no ``nn.Linear``, several, or the network output around the consumer; a
                module with per-feature parameters other than one ``BatchNorm1d`` lies on the
                path; narrowing the producer breaks the forward pass (attention heads, gated
                products) or changes other consumer features; the path mixes features.
        """
        linears = self._linears()
        if producer not in linears:
            raise JunctionError(f"the model has no nn.Linear named {producer!r}")
        n = linears[producer].out_features
        calls = len(self.baseline.inputs.get(producer, []))
        if calls != 1:
            raise JunctionError(
                f"layer {producer!r} runs {calls} times in the probe's forward pass; a layer "
                "must run exactly once to be reduced"
            )
        start = self.passes
        everything = torch.ones(n, dtype=torch.bool)
        trace = self._run(producer, everything, fingerprints=True)
        consumer, changed = self._reached(producer, trace)
        cons = linears[consumer]
        if cons.in_features != n or len(self.baseline.inputs[consumer]) != 1:
            raise JunctionError(
                f"the output of {producer!r} ({n} features) reaches {consumer!r}, which reads "
                f"{cons.in_features} features in {len(self.baseline.inputs[consumer])} call(s); "
                "a junction needs a one-to-one path to a consumer that runs once"
            )
        if self._output_changed(trace):
            raise JunctionError(
                f"the output of {producer!r} reaches the network output other than through its "
                f"consumer {consumer!r} (a residual connection, or the activations are returned); "
                "its neurons cannot be removed"
            )
        for pattern in _bit_patterns(n):
            patterned = self._run(producer, pattern)
            reached, changed = self._reached(producer, patterned)
            if reached != consumer or bool((changed & ~pattern).any()):
                raise JunctionError(
                    f"the path from {producer!r} to {consumer!r} mixes features: perturbing "
                    f"features {_indices(pattern)} of {producer!r} changed features "
                    f"{_indices(changed)} of the input of {reached!r}; only elementwise modules "
                    "may lie between the two (LayerNorm, softmax and attention mix features)"
                )
        path, batchnorm = self._path(producer, consumer, n, trace)
        self._narrow(producer, consumer, batchnorm, n, path)
        return ProbeResult(producer, consumer, batchnorm, path, self.passes - start)

    def _output_changed(self, trace: _Trace) -> bool:
        old = self.baseline.output
        return len(trace.output) != len(old) or any(
            _differs(a, b, self.tolerance) for a, b in zip(trace.output, old, strict=True)
        )

    def _reached(self, producer: str, trace: _Trace) -> tuple[str, Tensor]:
        reached: dict[str, Tensor] = {}
        for name, per_call in trace.changed.items():
            if name == producer:
                continue
            for changed in per_call:
                if changed.any():
                    reached[name] = reached[name] | changed if name in reached else changed
        if not reached:
            out_changed = self._output_changed(trace)
            raise JunctionError(
                f"the output of {producer!r} reaches no nn.Linear"
                + (
                    ": it is (or flows into) the network output, so it has no consumer"
                    if out_changed
                    else " and does not change the network output (unused on the probe batch)"
                )
            )
        if len(reached) > 1:
            raise JunctionError(
                f"the output of {producer!r} feeds {len(reached)} nn.Linear layers "
                f"{sorted(reached)}; a junction must have exactly one consumer nn.Linear"
            )
        ((name, changed),) = reached.items()
        return name, changed

    def _path(
        self, producer: str, consumer: str, n: int, trace: _Trace
    ) -> tuple[tuple[str, ...], str | None]:
        modules = dict(self.model.named_modules())
        base = self.baseline.fingerprints
        if len(base) != len(trace.fingerprints):
            raise JunctionError(
                f"perturbing {producer!r} changed which modules run; the forward pass depends on "
                "the values of its output"
            )
        path: list[str] = []
        batchnorm = None
        pairs = zip(base, trace.fingerprints, strict=True)
        differ = _host([_differ(new, old, self.tolerance) for (_, old), (_, new) in pairs])
        for (name, _), changed in zip(base, differ, strict=True):
            m = modules[name]
            if not changed or any(True for _ in m.children()):
                continue
            path.append(f"{name} ({type(m).__name__})")
            if isinstance(m, nn.BatchNorm1d) and m.num_features == n and batchnorm is None:
                batchnorm = name
            elif _per_feature_state(m, n):
                raise JunctionError(
                    f"between {producer!r} and {consumer!r} lies {name!r} "
                    f"({type(m).__name__}) with per-feature parameters; only one BatchNorm1d "
                    "can be sliced with the producer"
                )
        return tuple(path), batchnorm

    def _narrow(
        self, producer: str, consumer: str, batchnorm: str | None, n: int, path: tuple[str, ...]
    ) -> None:
        """Run the network with feature ``n // 2`` removed; the consumer must read the rest."""
        if n < 2:
            return
        dropped = n // 2
        kept = torch.tensor([j for j in range(n) if j != dropped])
        cons = self.model.get_submodule(consumer)
        names = [x for x in (producer, batchnorm, consumer) if x is not None]
        originals = {x: self.model.get_submodule(x) for x in names}
        junction = Junction(producer, "producer", producer, consumer, batchnorm, n)
        seen: list[Tensor] = []
        error: Exception | None = None
        try:
            W_p = cons.weight.detach()[:, kept.to(cons.weight.device)]
            b_p = cons.bias.detach() if cons.bias is not None else None
            apply_reduction(self.model, junction, kept, W_p, b_p)
            handle = self.model.get_submodule(consumer).register_forward_pre_hook(
                lambda module, args: seen.append(args[0].detach().clone())
            )
            try:
                with _evaluating(self.model):
                    self.call(self.model, self.example)
            except Exception as err:  # any failure is the answer
                error = err
            finally:
                handle.remove()
        finally:
            for x, m in originals.items():
                replace_module(self.model, x, m)
        self.passes += 1
        hint = (
            "the features are reshaped (into attention heads, say) or combined with another "
            "layer's output of the same width (a gated MLP such as SwiGLU, act(gate(x)) * up(x), "
            "whose gate and up projections would have to be reduced together; not supported)"
        )
        if error is not None:
            raise JunctionError(
                f"the network fails with {producer!r} narrowed to {n - 1} of {n} features "
                f"({type(error).__name__}: {error}); {hint}"
            ) from error
        expected = self.baseline.inputs[consumer][0].index_select(
            -1, kept.to(self.baseline.inputs[consumer][0].device)
        )
        if len(seen) != 1 or _differs(seen[0], expected, self.tolerance):
            raise JunctionError(
                f"with {producer!r} narrowed to {n - 1} of {n} features, {consumer!r} no longer "
                f"reads the same values in the remaining features (path: {list(path)}); {hint}"
            )
