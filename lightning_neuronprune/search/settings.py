"""Typed, frozen settings of a reduction: the budget, the joint search, the held-out confirmation
and how batches are read.

Each is a plain dataclass, so ``LightningCLI`` (through jsonargparse) configures it from YAML::

    callbacks:
      - class_path: lightning_neuronprune.NeuronEliminationCallback
        init_args:
          max_degradation: "5%"
          joint: {strategy: sequential}
          confirm: {fraction: 0.5, confidence: 0.9}
          fit: {method: qr, ridge: 1.0e-3}

Every constructor checks its values at once and raises ``ValueError`` naming the field and the
bad value.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.search.decision import APPLY_MODES
from lightning_neuronprune.search.strategies import STRATEGIES
from lightning_neuronprune.search.sweep import Ranks, rank_grid

__all__ = [
    "ConfirmSettings",
    "DataOptions",
    "JointSettings",
    "SearchSettings",
    "parse_budget",
    "settings_from",
]

_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*%\s*$")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def parse_budget(value: Any, name: str = "max_degradation") -> tuple[float, bool]:
    """Read a budget: ``(amount, relative)``.

    A number is an absolute budget in the metric's own units (``0.02`` = 2 points of accuracy,
    ``0.5`` = half a unit of perplexity); a string ``"N%"`` is relative to the unreduced model's
    metric (``"5%"``: perplexity may rise by 5 %, accuracy may fall by 5 % of itself).

    Example:
        >>> parse_budget(0.02), parse_budget("5%")
        ((0.02, False), (0.05, True))

    Raises:
        ValueError: naming ``name`` and the value, for anything else or a negative amount.
    """
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if match is None:
            raise ValueError(
                f"`{name}` as a string must be a percentage such as '5%', got {value!r}"
            )
        return float(match.group(1)) / 100, True
    if not _is_real(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative number in the metric's units (0.02 = 2 points of "
            f"accuracy) or a percentage string such as '5%', got {value!r}"
        )
    return float(value), False


@dataclass(frozen=True)
class ConfirmSettings:
    """The held-out confirmation of the choice (see
    :mod:`~lightning_neuronprune.search.confirmation`).

    By default half of the evaluation samples are held out, and a candidate is kept only when
    the upper bound of its held-out drop at 90 % confidence (Bonferroni-corrected for the
    candidates that may be tried; the standard error from paired drops over chunks of ``chunk``
    samples) is within three quarters of the budget. The bound covers the sampling error of the
    held-out estimate; the reserve covers data that differ from the evaluation data (MNIST's
    test digits are harder than its validation digits, and a reduced network loses more on
    them). ``ConfirmSettings(confidence=None, reserve=0.0)`` compares the held-out drop itself
    with the whole budget, a plain check.

    Attributes:
        fraction: the share of the evaluation samples held out, in [0, 1); 0 confirms nothing.
        margin: a fixed margin in the metric's units (scaled with the baseline when the budget
            is relative).
        confidence: the level of the upper confidence bound, in (0, 1), or ``None``.
        chunk: held-out samples per chunk of the paired standard error.
        max_tries: re-measure at most this many candidates.
        reserve: the share of the budget, in [0, 1), that the confirmed bound must leave unused.

    A candidate holds when ``bound ≤ budget · (1 - reserve) - margin``, where ``bound`` is the
    held-out drop plus ``z · stderr`` with a ``confidence``, else the held-out drop.
    """

    fraction: float = 0.5
    margin: float = 0.0
    confidence: float | None = 0.9
    chunk: int = 100
    max_tries: int = 20
    reserve: float = 0.25

    def __post_init__(self) -> None:
        if not (_is_real(self.fraction) and 0 <= self.fraction < 1):
            raise ValueError(f"`fraction` must be a fraction in [0, 1), got {self.fraction!r}")
        if not (_is_real(self.margin) and self.margin >= 0):
            raise ValueError(f"`margin` must be a non-negative number, got {self.margin!r}")
        if self.confidence is not None and not (
            _is_real(self.confidence) and 0 < self.confidence < 1
        ):
            raise ValueError(
                f"`confidence` must be None or a level in (0, 1), got {self.confidence!r}"
            )
        if not (_is_real(self.reserve) and 0 <= self.reserve < 1):
            raise ValueError(f"`reserve` must be a share in [0, 1), got {self.reserve!r}")
        for name in ("chunk", "max_tries"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class JointSettings:
    """The joint search over all targets under the one budget (see
    :mod:`~lightning_neuronprune.search.strategies`).

    Attributes:
        strategy: ``"greedy"`` (by marginal energy saved per accuracy lost, then re-fitted on
            data), ``"sequential"`` (junction by junction, statistics re-collected on the
            network reduced so far) or ``"allocate"`` (widths allocated by a local proxy that
            needs no forward pass, then at most ``max_evaluations`` evaluations; no per-layer
            sweeps, for many junctions).
        order: the sequential strategy's layer order (default: network order).
        shares: the sequential strategy's budget shares (default: equal).
        compensate: the greedy strategy also re-fits its path with compensating fits (each
            consumer fitted to the original network's output), up to 1.5 × the budget.
        uniform: the allocate strategy gives every layer the same fraction of its width (the
            same p where widths agree).
        multiple: the allocate strategy's widths are multiples of this (e.g. 64 or 128; the
            unreduced width is always allowed), or ``None`` for the rank grid.
        max_evaluations: the most full evaluations the allocate strategy spends (the baseline
            and the held-out confirmation come on top).
        proxy: the allocate strategy's local proxy: ``"loss"`` (default: the second-order loss
            increase, each consumer output weighted by its diagonal Fisher information from one
            backward pass over ``proxy_rows`` rows of the statistics data; see
            :mod:`~lightning_neuronprune.search.sensitivity`) or ``"energy"`` (the unexplained
            share of each consumer's own output energy; no gradient, but blind to how much each
            layer matters to the network).
        proxy_rows: rows of the first consumer's output (tokens of a language model, samples of
            an MLP) that the ``"loss"`` proxy's backward pass reads.
    """

    strategy: str = "greedy"
    order: Sequence[str] | None = None
    shares: Sequence[float] | None = None
    compensate: bool = False
    uniform: bool = False
    multiple: int | None = None
    max_evaluations: int = 20
    proxy: str = "loss"
    proxy_rows: int = 4096

    def __post_init__(self) -> None:
        if self.proxy not in ("loss", "energy"):
            raise ValueError(f"`proxy` must be 'loss' or 'energy', got {self.proxy!r}")
        if not _is_int(self.proxy_rows) or self.proxy_rows < 1:
            raise ValueError(f"`proxy_rows` must be a positive integer, got {self.proxy_rows!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if (self.order is not None or self.shares is not None) and self.strategy != "sequential":
            raise ValueError(
                f"`order` and `shares` apply to the 'sequential' strategy, got "
                f"strategy={self.strategy!r}"
            )
        if self.order is not None:
            order = self.order
            if (
                isinstance(order, str)
                or not isinstance(order, Sequence)
                or not order
                or not all(isinstance(t, str) and t for t in order)
                or len(set(order)) != len(order)
            ):
                raise ValueError(
                    f"`order` must be a non-empty list of distinct layer names, got {order!r}"
                )
            object.__setattr__(self, "order", tuple(order))
        if self.shares is not None:
            shares = self.shares
            if (
                isinstance(shares, (str, Mapping))
                or not isinstance(shares, Sequence)
                or not shares
                or not all(_is_real(w) and w >= 0 for w in shares)
                or sum(shares) <= 0
            ):
                raise ValueError(
                    f"`shares` must be non-negative numbers with a positive sum, got {shares!r}"
                )
            object.__setattr__(self, "shares", tuple(float(w) for w in shares))
        if not isinstance(self.compensate, bool):
            raise ValueError(f"`compensate` must be a bool, got {self.compensate!r}")
        if not isinstance(self.uniform, bool):
            raise ValueError(f"`uniform` must be a bool, got {self.uniform!r}")
        if self.multiple is not None and (not _is_int(self.multiple) or self.multiple < 1):
            raise ValueError(
                f"`multiple` must be a positive integer or None, got {self.multiple!r}"
            )
        if not _is_int(self.max_evaluations) or self.max_evaluations < 1:
            raise ValueError(
                f"`max_evaluations` must be a positive integer, got {self.max_evaluations!r}"
            )
        given = self.uniform or self.multiple is not None or self.max_evaluations != 20
        if given and self.strategy != "allocate":
            raise ValueError(
                f"`uniform`, `multiple` and `max_evaluations` apply to the 'allocate' strategy, "
                f"got strategy={self.strategy!r}"
            )


@dataclass(frozen=True)
class DataOptions:
    """How batches are read (each adapter ``None`` for the default rule).

    Attributes:
        input_fn: maps a batch to the model input; the default
            (:func:`~lightning_neuronprune.core.batches.batch_input`) takes ``x`` of
            ``(x, y)``, and for a Hugging Face-style dict (``input_ids``...) the dict less its
            ``labels``.
        target_fn: maps a batch to the metric's target; the default takes ``y`` of ``(x, y)`` or
            the ``labels`` of a dict.
        output_fn: maps the model output to the metric's predictions; the default takes a
            tensor, the ``logits`` of a Hugging Face output, or the first element of a tuple.
        mask_fn: maps a batch to its padding mask (B, T), non-zero for real tokens; the default
            takes a dict's ``attention_mask``.
        loss_fn: ``(predictions, target) -> scalar`` loss summed over a batch, whose gradients
            weigh the allocate strategy's proxy; the default
            (:func:`~lightning_neuronprune.search.sensitivity.default_loss`) is the next-token
            log-likelihood for a causal-LM perplexity, cross-entropy for class scores and
            squared error for a target of the predictions' shape.
        probe_samples: samples of the first training batch used to find the junctions.
    """

    input_fn: Callable[[Any], Any] | None = None
    target_fn: Callable[[Any], Any] | None = None
    output_fn: Callable[[Any], Any] | None = None
    mask_fn: Callable[[Any], Any] | None = None
    loss_fn: Callable[[Any, Any], Any] | None = None
    probe_samples: int = 8

    def __post_init__(self) -> None:
        for name, fn in self.adapters().items():
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable, got {fn!r}")
        if not _is_int(self.probe_samples) or self.probe_samples < 1:
            raise ValueError(
                f"`probe_samples` must be a positive integer, got {self.probe_samples!r}"
            )

    def adapters(self) -> dict[str, Callable[[Any], Any] | None]:
        """``input_fn``, ``target_fn``, ``output_fn``, ``mask_fn`` and ``loss_fn`` by name."""
        return {
            "input_fn": self.input_fn,
            "target_fn": self.target_fn,
            "output_fn": self.output_fn,
            "mask_fn": self.mask_fn,
            "loss_fn": self.loss_fn,
        }


@dataclass(frozen=True)
class SearchSettings:
    """What to search and how to choose.

    Attributes:
        ranks: the grid of p of every junction (see
            :func:`~lightning_neuronprune.search.sweep.rank_grid`).
        max_degradation: the budget: how much worse the metric may get, in its own units, or
            relative to the unreduced model's value with ``relative`` (see :func:`parse_budget`);
            a string ``"N%"`` stands for ``N / 100`` with ``relative=True``.
        relative: whether ``max_degradation`` is a fraction of the baseline metric.
        options: the selection and least-squares options.
        apply: ``"max_energy_saving"``, ``None`` or ``{layer: p}`` (see
            :func:`~lightning_neuronprune.search.decision.decide`).
        joint: the joint search (a strategy name stands for its default
            :class:`JointSettings`), or ``None`` (single layers only).
        max_samples: samples for statistics that the joint search re-collects.
        confirm: the held-out confirmation, or ``None``. It runs only with
            ``apply="max_energy_saving"``; otherwise no evaluation data is held out.

    Raises:
        ValueError: naming the bad setting and its value.
    """

    ranks: Ranks = "auto"
    max_degradation: float = 0.02
    relative: bool = False
    options: FitOptions = field(default_factory=FitOptions)
    apply: str | Mapping[str, int] | None = "max_energy_saving"
    joint: JointSettings | str | None = field(default_factory=JointSettings)
    max_samples: int | None = 60_000
    confirm: ConfirmSettings | None = None

    def __post_init__(self) -> None:
        rank_grid(10**6, self.ranks)
        amount, relative = parse_budget(self.max_degradation)
        if relative:  # "5%" reads as 0.05 relative to the baseline
            object.__setattr__(self, "max_degradation", amount)
            object.__setattr__(self, "relative", True)
        if not isinstance(self.relative, bool):
            raise ValueError(f"`relative` must be a bool, got {self.relative!r}")
        if not isinstance(self.options, FitOptions):
            raise ValueError(f"`options` must be a FitOptions, got {self.options!r}")
        apply = self.apply
        if isinstance(apply, Mapping):
            bad = {k: v for k, v in apply.items() if not isinstance(k, str) or not _is_int(v)}
            if bad or not apply or any(v < 1 for v in apply.values()):
                raise ValueError(
                    f"`apply` as a mapping must be a non-empty {{layer: p}} with p ≥ 1, got "
                    f"{apply!r}"
                )
        elif apply is not None and apply not in APPLY_MODES:
            raise ValueError(
                f"`apply` must be one of {list(APPLY_MODES)}, None or {{layer: p}}, got {apply!r}"
            )
        if isinstance(self.joint, str):
            object.__setattr__(self, "joint", JointSettings(self.joint))
        if self.joint is not None and not isinstance(self.joint, JointSettings):
            raise ValueError(f"`joint` must be a JointSettings or None, got {self.joint!r}")
        if self.max_samples is not None and (not _is_int(self.max_samples) or self.max_samples < 1):
            raise ValueError(
                f"`max_samples` must be a positive integer or None, got {self.max_samples!r}"
            )
        if self.confirm is not None:
            if not isinstance(self.confirm, ConfirmSettings):
                raise ValueError(
                    f"`confirm` must be a ConfirmSettings or None, got {self.confirm!r}"
                )
            left = self.max_degradation * (1 - self.confirm.reserve)
            if self.confirm.margin > left:
                raise ValueError(
                    f"`margin` must not exceed the budget left after the reserve, "
                    f"max_degradation={self.max_degradation} × (1 - reserve) = {left:.6g}, got "
                    f"{self.confirm.margin!r}"
                )

    def absolute(self, baseline: float) -> SearchSettings:
        """These settings with the budget (and a confirmation margin) in the metric's units,
        given the unreduced model's metric ``baseline``."""
        if not self.relative:
            return self
        scale = abs(float(baseline))
        confirm = self.confirm
        if confirm is not None:
            confirm = dataclasses.replace(confirm, margin=confirm.margin * scale)
        return SearchSettings(
            self.ranks, self.max_degradation * scale, False, self.options, self.apply,
            self.joint, self.max_samples, confirm,
        )  # fmt: skip


def settings_from(cls: type, value: Any, name: str) -> Any:
    """``value`` as a ``cls`` settings object: ``None``, a string (a joint strategy) or an
    instance pass through, a mapping gives its fields (``confirm={"fraction": 0.3}``)."""
    if isinstance(value, Mapping):
        try:
            return cls(**value)
        except TypeError as err:
            raise ValueError(f"`{name}` has an unknown field: {err}") from err
    if value is None or isinstance(value, cls) or (cls is JointSettings and isinstance(value, str)):
        return value
    raise ValueError(
        f"`{name}` must be a {cls.__name__}, a mapping of its fields or None, got {value!r}"
    )
