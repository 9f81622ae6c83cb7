"""Conv junctions found by behaviour: a probe of the model on one real batch.

The conv counterpart of :mod:`lightning_neuronprune.structure.probe`, for models that
:mod:`torch.fx` cannot trace (or whose per-channel modules no list knows). Layers are the
``nn.Linear`` modules and the convs of
:data:`~lightning_neuronprune.structure.conv.CONV_LAYERS`; channels are dimension 1 of a conv's
input and output, and a ``Linear`` after a flatten reads n groups of P features.

1. **Baseline** (one pass, at construction): every layer call's input and output, and a
   fingerprint of every module's output.
2. **Reach** (one pass): add ``1 + |y|`` to every output channel of the producer while every
   other layer returns its baseline output. Exactly one layer input may change (the consumer) and
   the network output may not (a residual path around the consumer).
3. **Channel map** (2⌈log₂ n⌉ passes): perturb the channels whose index has bit b set, then
   those where it is clear; the consumer may change only in the perturbed channels (for a
   ``Linear``: only in their groups of P features).
4. **Narrowing** (one pass): the producer without channel n // 2 (and its batch norm, and the
   consumer's matching columns); the consumer must read exactly the rest of its baseline input.

Refusals are those of :mod:`~lightning_neuronprune.structure.conv_tracing`: grouped and
depthwise convs, several consumers, residual streams, and any module on the path with
per-channel state other than one batch norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.batches import call_model
from lightning_neuronprune.core.runtime import evaluating
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.conv import CHANNEL_NORMS, CONV_LAYERS, placeholder_fit
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import replace_module
from lightning_neuronprune.structure.perturbation import (
    bit_patterns,
    differs,
    fingerprint,
    tensors,
    threshold,
)
from lightning_neuronprune.structure.surgery import apply_reduction

__all__ = ["ConvProbe"]

#: Relative change (to the largest magnitude of a tensor) below which a value counts as unchanged.
TOLERANCE = 1e-5


@dataclass
class _Trace:
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    changed: dict[str, list[Tensor]] = field(default_factory=dict)
    output: list[Tensor] = field(default_factory=list)
    fingerprints: list[tuple[str, Tensor]] = field(default_factory=list)


def _changed(new: Tensor, old: Tensor, conv: bool, tol: float) -> Tensor:
    """Which channels (dim 1 of a conv input) or features (last dim) of ``new`` differ."""
    if new.shape != old.shape:
        return torch.ones(new.shape[1 if conv else -1], dtype=torch.bool)
    diff = (new - old).abs()
    diff = (
        diff.movedim(1, 0).reshape(diff.shape[1], -1)
        if conv
        else diff.reshape(-1, diff.shape[-1]).T
    )
    return (diff.amax(1) > threshold(old, tol)).cpu()


class ConvProbe:
    """Finds the consumer of a producer conv by its behaviour on one batch.

    Args:
        model: the network; run in ``eval()`` mode under ``torch.no_grad()`` and left unchanged.
        example: one model input, on the model's device (a few samples are enough).
        call: runs the model on ``example`` (default
            :func:`~lightning_neuronprune.core.batches.call_model`).
        tolerance: relative change below which a value counts as unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        example: Any,
        *,
        call: Callable[[nn.Module, Any], Any] | None = None,
        tolerance: float = TOLERANCE,
    ) -> None:
        self.model, self.example = model, example
        self.call = call or call_model
        self.tolerance = tolerance
        self.passes = 0
        self.baseline = self._run(fingerprints=True)

    def _run(
        self, producer: str | None = None, channels: Tensor | None = None, *, fingerprints=False
    ) -> _Trace:
        trace = _Trace()

        def layer_hook(name: str, conv: bool) -> Callable[..., Any]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
                if producer is None:
                    trace.inputs.setdefault(name, []).append(args[0].detach().clone())
                    trace.outputs.setdefault(name, []).append(output.detach().clone())
                    return None
                k = len(trace.changed.setdefault(name, []))
                old_in = self.baseline.inputs.get(name, [])
                trace.changed[name].append(
                    _changed(args[0], old_in[k], conv, self.tolerance)
                    if k < len(old_in)
                    else torch.zeros(0, dtype=torch.bool)
                )
                if name == producer:
                    shape = [1, -1] + [1] * (output.dim() - 2)
                    mask = channels.to(output.device).reshape(shape)  # type: ignore[union-attr]
                    return torch.where(mask, output + 1 + output.abs(), output)
                old = self.baseline.outputs.get(name, [])
                # a copy: an in-place module after this layer would otherwise rewrite the stored
                # baseline for every later pass
                return old[k].clone() if k < len(old) and old[k].shape == output.shape else None

            return hook

        def module_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                trace.fingerprints.append((name, fingerprint(output)))

            return hook

        handles = []
        try:
            for name, m in self.model.named_modules():
                if isinstance(m, (nn.Linear, *CONV_LAYERS)):
                    conv = isinstance(m, CONV_LAYERS)
                    handles.append(m.register_forward_hook(layer_hook(name, conv)))
                elif fingerprints:
                    handles.append(m.register_forward_hook(module_hook(name)))
            with evaluating(self.model), torch.no_grad():
                out = self.call(self.model, self.example)
            trace.output = [t.detach().clone() for t in tensors(out)]
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        return trace

    def _output_changed(self, trace: _Trace) -> bool:
        old = self.baseline.output
        return len(trace.output) != len(old) or any(
            differs(a, b, self.tolerance) for a, b in zip(trace.output, old, strict=True)
        )

    def _reached(self, producer: str, trace: _Trace, n: int) -> tuple[str, Tensor]:
        """The one layer whose input changed, and its changed channels (n,)."""
        reached: dict[str, Tensor] = {}
        for name, per_call in trace.changed.items():
            for changed in per_call:
                if name != producer and changed.any():
                    reached[name] = reached[name] | changed if name in reached else changed
        if not reached:
            raise JunctionError(
                f"the output channels of {producer!r} reach no conv or nn.Linear"
                + (" (they flow into the network output)" if self._output_changed(trace) else "")
            )
        if len(reached) > 1:
            raise JunctionError(
                f"the output channels of {producer!r} feed {len(reached)} layers "
                f"{sorted(reached)}; a conv junction must have exactly one consumer"
            )
        ((name, changed),) = reached.items()
        conv = isinstance(self.model.get_submodule(name), CONV_LAYERS)
        if changed.numel() != n if conv else changed.numel() % n:
            raise JunctionError(
                f"the output channels of {producer!r} ({n}) reach {name!r}, which reads "
                f"{changed.numel()} {'channels' if conv else 'features'}: not these channels "
                "(a concatenation?) or their flattened positions"
            )
        return name, changed.reshape(n, -1).any(1)

    def find(self, producer: str) -> tuple[str, str | None, tuple[str, ...]]:
        """``(consumer, batchnorm, path)`` of the producer conv, or a :class:`JunctionError`."""
        modules = dict(self.model.named_modules())
        prod = modules.get(producer)
        if not isinstance(prod, CONV_LAYERS) or prod.groups > 1:
            raise JunctionError(f"{producer!r} is not a conv with groups=1")
        if len(self.baseline.inputs.get(producer, [])) != 1:
            raise JunctionError(f"layer {producer!r} must run exactly once in the probe's pass")
        n = prod.out_channels
        trace = self._run(producer, torch.ones(n, dtype=torch.bool), fingerprints=True)
        consumer, _ = self._reached(producer, trace, n)
        cons = modules[consumer]
        if isinstance(cons, CONV_LAYERS) and cons.groups > 1:
            raise JunctionError(
                f"consumer {consumer!r} is a grouped or depthwise convolution "
                f"(groups={cons.groups}); not supported"
            )
        if len(self.baseline.inputs[consumer]) != 1:
            raise JunctionError(f"consumer {consumer!r} must run exactly once in the probe's pass")
        if self._output_changed(trace):
            raise JunctionError(
                f"the output channels of {producer!r} reach the network output other than "
                f"through {consumer!r}: they are on a residual stream"
            )
        for pattern in bit_patterns(n):
            reached, changed = self._reached(producer, self._run(producer, pattern), n)
            if reached != consumer or bool((changed & ~pattern).any()):
                raise JunctionError(
                    f"the path from {producer!r} to {consumer!r} mixes channels: perturbing "
                    f"{int(pattern.sum())} channels changed others of {reached!r}"
                )
        path, batchnorm = self._path(producer, consumer, n, trace, modules)
        self._narrow(Junction(producer, "conv", producer, consumer, batchnorm, n, path))
        return consumer, batchnorm, path

    def _path(
        self, producer: str, consumer: str, n: int, trace: _Trace, modules: dict[str, nn.Module]
    ) -> tuple[tuple[str, ...], str | None]:
        if len(self.baseline.fingerprints) != len(trace.fingerprints):
            raise JunctionError(f"perturbing {producer!r} changed which modules run")
        path: list[str] = []
        batchnorm = None
        for (name, old), (_, new) in zip(
            self.baseline.fingerprints, trace.fingerprints, strict=True
        ):
            m = modules[name]
            if not differs(new, old, self.tolerance) or any(True for _ in m.children()):
                continue
            path.append(f"{name} ({type(m).__name__})")
            state = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if isinstance(m, CHANNEL_NORMS) and m.num_features == n and batchnorm is None:
                batchnorm = name
            elif any(n in t.shape for t in state if t.dim() > 0):
                raise JunctionError(
                    f"between {producer!r} and {consumer!r} lies {name!r} ({type(m).__name__}) "
                    "with per-channel parameters; only one batch norm is sliced with the producer"
                )
        return tuple(path), batchnorm

    def _narrow(self, junction: Junction) -> None:
        """Drop channel n // 2; the consumer must read exactly the rest of its input."""
        n = junction.num_features
        if n < 2:
            return
        kept = torch.tensor([j for j in range(n) if j != n // 2])
        names = [x for x in (junction.producer, junction.batchnorm, junction.consumer) if x]
        originals = {x: self.model.get_submodule(x) for x in names}
        seen: list[Tensor] = []
        error: Exception | None = None
        try:
            apply_reduction(
                self.model, junction, kept, *placeholder_fit(self.model, junction, kept)
            )
            handle = self.model.get_submodule(junction.consumer).register_forward_pre_hook(
                lambda module, args: seen.append(args[0].detach().clone())
            )
            try:
                with evaluating(self.model), torch.no_grad():
                    self.call(self.model, self.example)
            except Exception as err:  # any failure is the answer
                error = err
            finally:
                handle.remove()
        finally:
            for x, m in originals.items():
                replace_module(self.model, x, m)
        self.passes += 1
        base = self.baseline.inputs[junction.consumer][0]
        grouped = base.reshape(base.shape[0], n, -1) if base.dim() == 2 else base
        expected = grouped.index_select(1, kept.to(base.device)).reshape(base.shape[0], -1)
        if (
            error is not None
            or len(seen) != 1
            or differs(seen[0].reshape(base.shape[0], -1), expected, self.tolerance)
        ):
            raise JunctionError(
                f"with {junction.producer!r} narrowed to {n - 1} of {n} channels, "
                f"{junction.consumer!r} does not read the rest of its input: the channels are "
                "added to others whose number is fixed (a residual stream), or reshaped"
                + (f" ({type(error).__name__}: {error})" if error is not None else "")
            ) from error
