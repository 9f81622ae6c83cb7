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
    "describe_indices",
    "differs",
    "fingerprint",
    "per_feature_state",
    "perturbed",
    "tensors",
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
    perturbed pass, per call, which input features differ from the baseline (``changed``)."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    changed: dict[str, list[Tensor]] = field(default_factory=dict)
    output: list[Tensor] = field(default_factory=list)
    fingerprints: list[tuple[str, Tensor]] = field(default_factory=list)


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
    parts = [
        torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()])
        for t in tensors(value)
        if t.is_floating_point()
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def differs(a: Tensor, b: Tensor, tol: float = TOLERANCE) -> bool:
    if a.shape != b.shape:
        return True
    if not a.is_floating_point():
        return bool((a != b).any())
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() > tol * (scale + tol)).any())


def changed_features(new: Tensor, old: Tensor, tol: float = TOLERANCE) -> Tensor:
    """(n,) bool: which features (last dimension) of ``new`` differ from ``old``."""
    if new.shape != old.shape:
        return torch.ones(new.shape[-1] if new.dim() else 1, dtype=torch.bool)
    diff = (new - old).abs().reshape(-1, old.shape[-1]).amax(0)
    scale = float(old.abs().max()) if old.numel() else 0.0
    return (diff > tol * (scale + tol)).cpu()


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
