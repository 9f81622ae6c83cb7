"""The callback's arguments and attributes of the previous release, mapped onto the new ones.

``NeuronEliminationCallback(max_accuracy_drop=0.01, method="qr", confirm_fraction=0.3)`` still
works for one release: each old keyword warns (``FutureWarning``) and lands in the settings
object that now holds it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.search.confirmation import Confirmation
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.pipeline import SearchResult
from lightning_neuronprune.search.settings import ConfirmSettings, DataOptions, JointSettings
from lightning_neuronprune.search.sweep import SweepPoint

__all__ = ["RENAMED", "DeprecatedAttributes", "deprecated_arguments"]

#: Old keyword → (new argument, field of its settings object or ``None`` for the argument itself).
RENAMED: dict[str, tuple[str, str | None]] = {
    "max_accuracy_drop": ("max_degradation", None),
    "method": ("fit", "method"),
    "affine": ("fit", "affine"),
    "ridge": ("fit", "ridge"),
    "joint_order": ("joint", "order"),
    "joint_shares": ("joint", "shares"),
    "joint_compensate": ("joint", "compensate"),
    "confirm_fraction": ("confirm", "fraction"),
    "confirm_margin": ("confirm", "margin"),
    "confirm_confidence": ("confirm", "confidence"),
    "confirm_chunk": ("confirm", "chunk"),
    "confirm_max_tries": ("confirm", "max_tries"),
    "input_fn": ("data", "input_fn"),
    "target_fn": ("data", "target_fn"),
    "output_fn": ("data", "output_fn"),
    "mask_fn": ("data", "mask_fn"),
    "probe_samples": ("data", "probe_samples"),
}


def deprecated_arguments(
    old: dict[str, Any],
    *,
    fit: FitOptions | None,
    joint: JointSettings | str | None,
    confirm: ConfirmSettings | None,
    data: DataOptions | None,
) -> dict[str, Any]:
    """Fold the old keywords ``old`` into the new arguments.

    Returns:
        ``{"fit", "joint", "confirm", "data", "top_k"}`` and, when given the old way,
        ``"max_degradation"``.

    Raises:
        TypeError: an unknown keyword (as Python would for a misspelt argument).
        ValueError: a value the settings object refuses, or an old keyword combined with the
            settings object that replaces it.
    """
    unknown = sorted(set(old) - set(RENAMED) - {"top_k"})
    if unknown:
        raise TypeError(f"NeuronEliminationCallback got unexpected keyword arguments {unknown}")
    out: dict[str, Any] = {"top_k": old.get("top_k", 1)}
    if "top_k" in old:
        _warn("top_k", "metric=MulticlassAccuracy(num_classes, top_k=k)")
    if not (isinstance(out["top_k"], int) and not isinstance(out["top_k"], bool)) or (
        out["top_k"] < 1
    ):
        raise ValueError(f"`top_k` must be a positive integer, got {out['top_k']!r}")
    new = {"fit": fit, "joint": joint, "confirm": confirm, "data": data}
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in old.items():
        if name == "top_k":
            continue
        target, attr = RENAMED[name]
        _warn(name, target if attr is None else f"{target}=...({attr}=...)")
        if attr is None:
            out[target] = value
        else:
            grouped.setdefault(target, {})[attr] = value
    for target, values in grouped.items():
        current = new[target]
        if target == "joint":
            if current is None:
                raise ValueError(f"{sorted(values)} need a joint strategy, got joint=None")
            current = JointSettings(current) if isinstance(current, str) else current
        elif target == "fit":
            current = current if current is not None else FitOptions(method="output")
        elif target == "data":
            current = current if current is not None else DataOptions()
        elif target == "confirm":
            if values.get("fraction") in (None, 0):  # the old way of turning it off
                new["confirm"] = None
                continue
            current = current if current is not None else ConfirmSettings()
        new[target] = dataclasses.replace(current, **values)
    return out | new


def _warn(name: str, replacement: str) -> None:
    warnings.warn(
        f"`NeuronEliminationCallback({name}=...)` is deprecated and will be removed in the next "
        f"release; use `{replacement}`",
        FutureWarning,
        stacklevel=4,
    )


class DeprecatedAttributes:
    """The callback's result attributes of the previous release, read from ``result`` (a
    :class:`~lightning_neuronprune.search.pipeline.SearchResult`) with a ``FutureWarning``."""

    result: SearchResult | None

    def _old(self, name: str, new: str) -> None:
        warnings.warn(
            f"`NeuronEliminationCallback.{name}` is deprecated; use `callback.result.{new}`",
            FutureWarning,
            stacklevel=3,
        )

    @property
    def points(self) -> dict[str, list[SweepPoint]]:
        self._old("points", "points")
        return dict(self.result.points) if self.result is not None else {}

    @property
    def joint_points(self) -> list[JointPoint]:
        self._old("joint_points", "joint_points")
        return list(self.result.joint_points) if self.result is not None else []

    @property
    def results(self) -> list[dict[str, Any]]:
        self._old("results", "every")
        return [pt.as_dict() for pt in self.result.every] if self.result is not None else []

    @property
    def chosen(self) -> SweepPoint | JointPoint | None:
        self._old("chosen", "decision.chosen")
        return self.result.decision.chosen if self.result is not None else None

    @property
    def confirmations(self) -> list[Confirmation[Any]]:
        self._old("confirmations", "confirmations")
        return list(self.result.confirmations) if self.result is not None else []

    @property
    def applied(self) -> dict[str, int]:
        self._old("applied", "decision.plan")
        r = self.result
        return dict(r.decision.plan) if r is not None and r.applied else {}
