"""The measurements the behavioural probe makes (:mod:`lightning_neuronprune.structure.probe`):
what one forward pass recorded, fingerprints of module outputs, which features changed, the
perturbation ``δ = 1 + |y|`` and the bit patterns that pin feature j to feature j; and what the
probe finds, a :class:`ProbeResult`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TOLERANCE",
    "ProbeResult",
    "Trace",
    "bit_patterns",
    "changed_features",
    "changes_to_host",
    "describe_indices",
    "differ",
    "differs",
    "fingerprint",
    "per_feature_state",
    "perturbed",
    "tensors",
    "threshold",
    "to_host",
]

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
        producers: every producer of the junction, in module order: ``(producer,)``, or a gated
            FFN's gate and up projections.
        fused: the producer has 2n outputs whose halves both reach consumer feature j.
    """

    producer: str
    consumer: str
    batchnorm: str | None
    path: tuple[str, ...]
    passes: int
    producers: tuple[str, ...] = ()
    fused: bool = False


@dataclass
class Trace:
    """What one pass recorded: in the baseline, every ``nn.Linear`` call's input and output; in a
    perturbed pass, per call, which input features differ from the baseline (``changed``).

    A pass at block scope (one block run alone) also records the tensors of its arguments after
    the run (``state``), and a perturbed one whether its output or those tensors differ from the
    block's baseline (``leaked``: the perturbation left the block)."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    changed: dict[str, list[Tensor]] = field(default_factory=dict)
    output: list[Tensor] = field(default_factory=list)
    fingerprints: list[tuple[str, Tensor]] = field(default_factory=list)
    state: list[Tensor] = field(default_factory=list)
    leaked: bool = False


def tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif hasattr(value, "to_tuple"):  # transformers' ModelOutput
        yield from tensors(value.to_tuple())


def fingerprint(value: Any) -> Tensor:
    """``[Σ t, Σ |t|]`` of every floating-point tensor in ``value``, accumulated in float64."""
    f64 = torch.float64
    parts = [
        torch.stack([t.detach().sum(dtype=f64), t.detach().abs().sum(dtype=f64)])
        for t in tensors(value)
        if t.is_floating_point()
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def threshold(old: Tensor, tol: float) -> Tensor | float:
    """``tol (max |old| + tol)``: a 0-d float64 tensor on ``old``'s device (no host read)."""
    if not old.numel():
        return tol * tol
    return tol * (old.abs().max().double() + tol)


def differ(a: Tensor, b: Tensor, tol: float = TOLERANCE) -> Tensor:
    """0-d bool on the device: whether ``a`` differs from ``b`` by more than
    ``tol (max |b| + tol)`` anywhere (any difference for integer tensors or other shapes)."""
    if a.shape != b.shape:
        return torch.ones((), dtype=torch.bool, device=a.device)
    if not a.is_floating_point():
        return (a != b).any()
    return ((a - b).abs() > threshold(b, tol)).any()


def differs(a: Tensor, b: Tensor, tol: float = TOLERANCE) -> bool:
    """:func:`differ` read on the host (one read)."""
    return bool(differ(a, b, tol))


def changed_features(new: Tensor, old: Tensor, tol: float = TOLERANCE) -> Tensor:
    """(n,) bool on ``new``'s device: which features (last dimension) of ``new`` differ from
    ``old``."""
    if new.shape != old.shape:
        return torch.ones(new.shape[-1] if new.dim() else 1, dtype=torch.bool, device=new.device)
    diff = (new - old).abs().reshape(-1, old.shape[-1]).amax(0)
    return diff > threshold(old, tol)


def to_host(masks: list[Tensor]) -> list[Tensor]:
    """Bool tensors (on any devices) copied to the host in one read."""
    if not masks:
        return []
    device = next((m.device for m in masks if m.device.type != "cpu"), masks[0].device)
    flat = torch.cat([m.reshape(-1).to(device) for m in masks]).cpu()
    parts = flat.split([m.numel() for m in masks])
    return [h.reshape(m.shape) for h, m in zip(parts, masks, strict=True)]


def changes_to_host(changed: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
    """The per-call feature masks of a pass, moved to the host in one read."""
    host = iter(to_host([m for per_call in changed.values() for m in per_call]))
    return {name: [next(host) for _ in per_call] for name, per_call in changed.items()}


def perturbed(y: Tensor, features: Tensor) -> Tensor:
    """``y`` with ``1 + |y|`` added to the chosen features (so each value moves by at least 1)."""
    mask = features.to(device=y.device)
    return torch.where(mask, y + 1 + y.abs(), y)


def bit_patterns(n: int) -> Iterator[Tensor]:
    j = torch.arange(n)
    for b in range(math.ceil(math.log2(n)) if n > 1 else 0):
        bit = (j >> b) & 1 == 1
        yield bit
        yield ~bit


def describe_indices(mask: Tensor, limit: int = 8) -> str:
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"[{shown}{', ...' if len(idx) > limit else ''}] ({len(idx)} features)"


def per_feature_state(module: nn.Module, n: int) -> bool:
    state = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(n in t.shape for t in state if t.dim() > 0)
