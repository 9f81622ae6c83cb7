"""Checking the arguments of a neuron-elimination run, before any training time is spent.

The core raises ``ValueError``/``TypeError`` naming the argument and the bad value; the Lightning
callback converts them to ``MisconfigurationException`` in one place.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.search.decision import APPLY_MODES
from lightning_neuronprune.search.strategies import STRATEGIES
from lightning_neuronprune.search.sweep import rank_grid
from lightning_neuronprune.structure.targets import Targets

__all__ = ["check_against_targets", "check_arguments"]


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


def check_arguments(
    *,
    targets: str | Sequence[str] | Mapping[str, str],
    ranks: Any,
    max_accuracy_drop: Any,
    options: Mapping[str, Any],
    top_k: Any,
    energy_model: Any,
    apply: Any,
    max_samples: Any,
    joint: Any,
    joint_order: Any,
    joint_shares: Any,
    verbose: Any = True,
    adapters: Mapping[str, Any] | None = None,
    probe_samples: Any = 8,
) -> str | list[str] | dict[str, str]:
    """Check every argument that does not need the model; return the targets as a list, a
    ``{target: consumer}`` dict, or ``"auto"``. ``adapters`` are the batch adapters by argument
    name (``input_fn``...), each callable or ``None``.

    Raises:
        ValueError: naming the argument (in backticks) and the bad value.
    """
    if isinstance(targets, Mapping):
        bad = {k: v for k, v in targets.items() if not (isinstance(k, str) and k)}
        bad |= {k: v for k, v in targets.items() if not (isinstance(v, str) and v)}
        if bad or not targets:
            raise ValueError(
                f"`targets` as a mapping must be a non-empty {{target: consumer}} of layer "
                f"names, got {targets!r}"
            )
        targets = dict(targets)
    elif targets != "auto":
        if isinstance(targets, str):
            targets = [targets]
        if isinstance(targets, Sequence) and not targets:
            raise ValueError(
                f"`targets` must be 'auto' or a non-empty list of layer names, got {targets!r}"
            )
        targets = _names(targets, "`targets`")
    rank_grid(10**6, ranks)
    if not _is_real(max_accuracy_drop) or not 0 <= max_accuracy_drop <= 1:
        raise ValueError(
            f"`max_accuracy_drop` must be a fraction in [0, 1] (0.02 = 2 points), got "
            f"{max_accuracy_drop!r}"
        )
    FitOptions(**options)
    if not _is_int(top_k) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
    if energy_model is not None and not isinstance(energy_model, EnergyModel):
        raise ValueError(
            f"`energy_model` must be an EnergyModel, got {type(energy_model).__name__} "
            f"{energy_model!r}"
        )
    if isinstance(apply, Mapping):
        bad = {k: v for k, v in apply.items() if not isinstance(k, str) or not _is_int(v) or v < 1}
        if bad or not apply:
            raise ValueError(
                f"`apply` as a mapping must be a non-empty {{layer: p}} with p ≥ 1, got {apply!r}"
            )
    elif apply is not None and apply not in APPLY_MODES:
        raise ValueError(
            f"`apply` must be one of {list(APPLY_MODES)}, None or {{layer: p}}, got {apply!r}"
        )
    if max_samples is not None and (not _is_int(max_samples) or max_samples < 1):
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples!r}")
    if joint is not None and joint not in STRATEGIES:
        raise ValueError(f"`joint` must be one of {list(STRATEGIES)} or None, got {joint!r}")
    if (joint_order is not None or joint_shares is not None) and joint != "sequential":
        raise ValueError(
            f"`joint_order` and `joint_shares` apply to `joint='sequential'`, got joint={joint!r}"
        )
    if joint_order is not None:
        joint_order = _names(joint_order, "`joint_order`")
        if targets != "auto" and len(joint_order) != len(targets):
            raise ValueError(
                f"`joint_order` must list each of the {len(targets)} targets once, got "
                f"{joint_order!r}"
            )
    if joint_shares is not None:
        if (
            isinstance(joint_shares, (str, Mapping))
            or not isinstance(joint_shares, Sequence)
            or not joint_shares
            or not all(_is_real(w) and w >= 0 for w in joint_shares)
            or sum(joint_shares) <= 0
        ):
            raise ValueError(
                f"`joint_shares` must be non-negative numbers with a positive sum, got "
                f"{joint_shares!r}"
            )
        if targets != "auto" and len(joint_shares) != len(targets):
            raise ValueError(
                f"`joint_shares` must have one share per target ({len(targets)}), got "
                f"{len(joint_shares)}: {joint_shares!r}"
            )
    if not isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be a bool, got {verbose!r}")
    for name, fn in (adapters or {}).items():
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be callable, got {fn!r}")
    if not _is_int(probe_samples) or probe_samples < 1:
        raise ValueError(f"`probe_samples` must be a positive integer, got {probe_samples!r}")
    return targets


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


def check_confirmation(
    *,
    confirm_fraction: Any,
    confirm_margin: Any,
    confirm_confidence: Any,
    confirm_chunk: Any,
    confirm_max_tries: Any,
    max_accuracy_drop: float,
) -> None:
    """Check the held-out confirmation's arguments (see
    :class:`~lightning_neuronprune.NeuronEliminationCallback`).

    Raises:
        ValueError: naming the argument (in backticks) and the bad value.
    """

    if confirm_fraction is not None and not (
        _is_real(confirm_fraction) and 0 <= confirm_fraction < 1
    ):
        raise ValueError(
            f"`confirm_fraction` must be None or a fraction in [0, 1), got {confirm_fraction!r}"
        )
    if not (_is_real(confirm_margin) and 0 <= confirm_margin <= max_accuracy_drop):
        raise ValueError(
            f"`confirm_margin` must be a number in [0, max_accuracy_drop={max_accuracy_drop}], "
            f"got {confirm_margin!r}"
        )
    if confirm_confidence is not None and not (
        _is_real(confirm_confidence) and 0 < confirm_confidence < 1
    ):
        raise ValueError(
            f"`confirm_confidence` must be None or a level in (0, 1), got {confirm_confidence!r}"
        )
    for name, value in (("confirm_chunk", confirm_chunk), ("confirm_max_tries", confirm_max_tries)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``
    (``bool`` arguments pass ``(True, False)`` and must be real bools)."""
    ok = value in allowed and (not isinstance(allowed[0], bool) or isinstance(value, bool))
    if not ok:
        expected = "a bool" if isinstance(allowed[0], bool) else f"one of {list(allowed)}"
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")
