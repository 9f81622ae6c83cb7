"""Checking the targets of a neuron-elimination run, before any training time is spent (the
settings objects of :mod:`~lightning_neuronprune.search.settings` check themselves).

The core raises ``ValueError``/``TypeError`` naming the argument and the bad value; the Lightning
callback converts them to ``MisconfigurationException`` in one place.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_neuronprune.structure.targets import Targets

__all__ = ["check_against_targets", "check_choice", "check_targets"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _names(value: Any, what: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{what} must be a non-empty list of layer names, got {value!r}")
    if not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{what} must be a non-empty list of layer names, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{what} has duplicates: {value!r}")
    return list(value)


def check_targets(
    targets: str | Sequence[str] | Mapping[str, str],
) -> str | list[str] | dict[str, str]:
    """Check the target names without the model; return them as a list, a
    ``{target: consumer}`` dict, or ``"auto"``.

    Raises:
        ValueError: naming ``targets`` and the bad value.
    """
    if isinstance(targets, Mapping):
        bad = {k: v for k, v in targets.items() if not (isinstance(k, str) and k)}
        bad |= {k: v for k, v in targets.items() if not (isinstance(v, str) and v)}
        if bad or not targets:
            raise ValueError(
                f"`targets` as a mapping must be a non-empty {{target: consumer}} of layer "
                f"names, got {targets!r}"
            )
        return dict(targets)
    if targets == "auto":
        return "auto"
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, Sequence) and not targets:
        raise ValueError(
            f"`targets` must be 'auto' or a non-empty list of layer names, got {targets!r}"
        )
    return _names(targets, "`targets`")


def check_against_targets(
    targets: Targets,
    apply: Any,
    joint_order: Sequence[str] | None,
    joint_shares: Sequence[float] | None,
) -> list[str] | None:
    """Check what names layers against the resolved targets: ``apply``'s ``{layer: p}`` and the
    sequential strategy's order and shares. Return the order as canonical layer names.

    While some layers are undecided (``targets.undecided``: ``"auto"`` before the probe), only
    names that are neither targets nor undecided layers are refused, and ``None`` is returned.

    Raises:
        ValueError: an unknown layer, a p above a layer's width, an order that is not a
            permutation of the targets, or shares that do not match them.
    """
    if targets.undecided:
        for what, names in (
            ("`apply`", apply if isinstance(apply, Mapping) else ()),
            ("`joint_order`", joint_order or ()),
        ):
            unknown = [n for n in names if n not in targets and n not in targets.undecided]
            if unknown:
                raise ValueError(
                    f"{what} names {unknown}, which are not among the targets "
                    f"{targets.names} nor the layers left to the probe {targets.undecided}"
                )
        return None
    if isinstance(apply, Mapping):
        for key, p in apply.items():
            if key not in targets:
                raise ValueError(
                    f"`apply` names {key!r}, which is not among the targets {targets.names}"
                )
            if p > targets[key].num_features:
                raise ValueError(
                    f"`apply` asks for p={p} in {key!r}, which has only "
                    f"{targets[key].num_features} features"
                )
    if joint_shares is not None and len(joint_shares) != len(targets):
        raise ValueError(
            f"`joint_shares` must have one share per target ({len(targets)}: {targets.layers}), "
            f"got {len(joint_shares)}: {list(joint_shares)!r}"
        )
    if joint_order is None:
        return None
    layers = targets.canonical(joint_order, "`joint_order`")
    if sorted(layers) != sorted(targets.layers):
        raise ValueError(
            f"`joint_order` must be a permutation of the targets {targets.layers}, got "
            f"{list(joint_order)!r}"
        )
    return layers


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``
    (``bool`` arguments pass ``(True, False)`` and must be real bools)."""
    ok = value in allowed and (not isinstance(allowed[0], bool) or isinstance(value, bool))
    if not ok:
        expected = "a bool" if isinstance(allowed[0], bool) else f"one of {list(allowed)}"
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
