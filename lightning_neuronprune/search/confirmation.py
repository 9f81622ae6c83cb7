"""Held-out confirmation of the accuracy budget.

A search that compares many configurations on the same evaluation data and keeps the best one
measures the winner's drop with a bias towards small values (selection bias): among hundreds of
configurations near the budget, the one that looks best is often the one whose noise helped. To
make the budget hold on data the search never saw, the evaluation data is split in two:

* **the split** (deterministic, hashed): counting samples across batches in loader order
  (``i = 0, 1, ...``), sample ``i`` goes to the *confirmation* part when
  ``splitmix64(i) / 2⁶⁴ < f`` for the confirmation fraction ``f``, else to the *search* part.
  The hash is a fixed pseudo-random function of the position alone, so the split does not depend
  on the batch size, the machine or any random state, and it has no period that sorted data
  could line up with (MNIST's training images alternate between two writer populations, so an
  even/odd split gives parts 1.2 points apart in accuracy). Every tensor of a batch whose first
  dimension is the batch size is sliced; other values are passed through.
* **the confirmation**: the candidates within the budget on the search part are taken down the
  front, from the lowest energy up; each is re-measured on the confirmation part against the
  unreduced model's metric there, and the first whose drop stays within the budget (minus an
  optional ``margin``) is the one to apply.

**The statistical margin** (optional, ``confidence``): the held-out part is itself a sample, so a
drop just under the budget there may still be over it on new data. The held-out part is cut into
chunks of consecutive samples (:func:`chunk_batches`); the paired per-chunk drops give a standard
error ``se`` of the held-out drop, and a candidate holds only when
``drop + z · se ≤ budget - margin``, with ``z`` the normal quantile at ``1 - (1 - confidence) / k``
for the ``k`` candidates that may be tried (Bonferroni: the chance that *any* tried configuration
passes while its true drop is over the budget stays below ``1 - confidence``).

The drop follows the metric's direction: ``baseline - value`` when higher is better (accuracy),
``value - baseline`` when lower is better (a loss, an error rate).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from lightning_neuronprune.errors import NeuronEliminationError

__all__ = [
    "Confirmation",
    "chunk_batches",
    "confirm_front",
    "front_within",
    "metric_drop",
    "paired_stderr",
    "split_batches",
]

P = TypeVar("P")


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, (tuple, list)):
        values: Iterable[Any] = batch
    elif isinstance(batch, dict):
        values = batch.values()
    else:
        return None
    for v in values:
        size = _batch_size(v)
        if size is not None:
            return size
    return None


def _take(batch: Any, index: Tensor, size: int) -> Any:
    if isinstance(batch, Tensor):
        if batch.dim() > 0 and batch.shape[0] == size:
            return batch[index.to(batch.device)]
        return batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_take(v, index, size) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, index, size) for v in batch)
    if isinstance(batch, dict):
        return {k: _take(v, index, size) for k, v in batch.items()}
    return batch


def _splitmix64(i: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014) of uint64 inputs, wrapping."""
    z = i + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(start: int, size: int) -> np.ndarray:
    """``splitmix64(i) / 2⁶⁴`` for ``i = start, ..., start + size - 1`` (float64 in [0, 1))."""
    with np.errstate(over="ignore"):
        z = _splitmix64(np.arange(start, start + size, dtype=np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def split_batches(data: Iterable[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """Split evaluation batches into a search part and a confirmation part (see the module doc).

    Args:
        data: evaluation batches (a ``DataLoader`` or any iterable): tensors, tuples, lists or
            dicts of tensors sharing the first (batch) dimension.
        fraction: ``f`` in (0, 1), the share of samples that go to the confirmation part.

    Returns:
        ``(search, confirm)``: two lists of batches; a batch whose samples all fall in one part
        appears in that part only.

    Raises:
        ValueError: ``fraction`` outside (0, 1).
        NeuronEliminationError: a batch without a tensor, or a part that would be empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"`fraction` must lie in (0, 1), got {fraction!r}")
    search: list[Any] = []
    confirm: list[Any] = []
    start = 0
    for batch in data:
        size = _batch_size(batch)
        if size is None:
            raise NeuronEliminationError(
                f"cannot split a batch of type {type(batch).__name__} for the held-out "
                "confirmation: it holds no tensor with a batch dimension"
            )
        to_confirm = torch.from_numpy(_uniform(start, size) < fraction)
        start += size
        for part, mask in ((search, ~to_confirm), (confirm, to_confirm)):
            if bool(mask.all()):
                part.append(batch)
            elif bool(mask.any()):
                part.append(_take(batch, torch.nonzero(mask).flatten(), size))
    if not search or not confirm:
        raise NeuronEliminationError(
            f"the evaluation data ({start} samples) is too small to split with a confirmation "
            f"fraction of {fraction}: one part would be empty"
        )
    return search, confirm


def chunk_batches(batches: Sequence[Any], size: int) -> list[list[Any]]:
    """Cut batches into chunks of ``size`` consecutive samples (the last chunk may be larger, up
    to ``2 · size - 1``); each chunk is a list of (possibly sliced) batches."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive integer, got {size!r}")
    chunks: list[list[Any]] = []
    count = size  # samples in the current chunk; start a new chunk at once
    for batch in batches:
        n = _batch_size(batch)
        if n is None:
            raise NeuronEliminationError(
                f"cannot chunk a batch of type {type(batch).__name__}: it holds no tensor"
            )
        lo = 0
        while lo < n:
            if count >= size:
                chunks.append([])
                count = 0
            hi = min(n, lo + size - count)
            piece = batch if (lo, hi) == (0, n) else _take(batch, torch.arange(lo, hi), n)
            chunks[-1].append(piece)
            count += hi - lo
            lo = hi
    if len(chunks) > 1 and count < size:  # fold a short tail into the chunk before
        chunks[-2].extend(chunks.pop())
    return chunks


def paired_stderr(
    baseline_chunks: Sequence[float],
    chunks: Sequence[float],
    *,
    higher_is_better: bool | None = True,
) -> float:
    """Standard error of the mean of the paired per-chunk drops (0 with fewer than 2 chunks)."""
    if len(baseline_chunks) != len(chunks):
        raise ValueError(
            f"paired chunks differ in number: {len(baseline_chunks)} and {len(chunks)}"
        )
    drops = [
        metric_drop(b, v, higher_is_better=higher_is_better)
        for b, v in zip(baseline_chunks, chunks, strict=True)
    ]
    if len(drops) < 2:
        return 0.0
    return statistics.stdev(drops) / math.sqrt(len(drops))


def metric_drop(baseline: float, value: float, *, higher_is_better: bool | None = True) -> float:
    """How much worse ``value`` is than ``baseline``: ``baseline - value`` when higher is better
    (also when the direction is unknown, ``None``), else ``value - baseline``."""
    return value - baseline if higher_is_better is False else baseline - value


@dataclass(frozen=True)
class Confirmation(Generic[P]):
    """One candidate re-measured on the confirmation part.

    Attributes:
        point: the candidate (a ``SweepPoint`` or ``JointPoint``).
        search_drop: its drop on the search part.
        confirmed_value: the metric of the reduced model on the confirmation part.
        confirmed_drop: its drop there, against the unreduced model on the same part.
        held: whether ``confirmed_drop (+ z · stderr) ≤ budget - margin``.
        upper_bound: ``confirmed_drop + z · stderr`` with a ``confidence`` (else ``None``).
    """

    point: P
    search_drop: float
    confirmed_value: float
    confirmed_drop: float
    held: bool
    upper_bound: float | None = None

    def as_dict(self) -> dict[str, Any]:
        point = self.point
        label = getattr(point, "label", None) or f"{point.layer}={point.p}"  # type: ignore[attr-defined]
        return {
            "configuration": label,
            "search_drop": self.search_drop,
            "confirmed_accuracy": self.confirmed_value,
            "confirmed_drop": self.confirmed_drop,
            "held": self.held,
            "upper_bound": self.upper_bound,
            "energy_ratio": point.energy_ratio,  # type: ignore[attr-defined]
            "memory_ratio": point.memory_ratio,  # type: ignore[attr-defined]
        }


def confirm_front(
    candidates: Sequence[P],
    measure: Callable[[P], Any],
    baseline: Any,
    budget: float,
    *,
    higher_is_better: bool | None = True,
    margin: float = 0.0,
    max_tries: int | None = None,
    confidence: float | None = None,
) -> tuple[P | None, list[Confirmation[P]]]:
    """Walk down the candidates until one keeps the budget on the confirmation part.

    Args:
        candidates: configurations within the budget on the search part, in the order to try
            them (the front from the lowest energy up). Each needs an ``accuracy_drop``
            attribute (its search drop).
        measure: the metric of a candidate's reduced model on the confirmation part.
        baseline: the unreduced model's metric on the confirmation part.
        budget: the largest accepted drop.
        higher_is_better: the metric's direction (``torchmetrics.Metric.higher_is_better``).
        margin: ask for ``confirmed_drop ≤ budget - margin`` (a safety margin, ≥ 0).
        max_tries: stop after this many candidates (``None``: all).
        confidence: ask for the upper confidence bound of the drop (see the module doc) to be
            within the budget. Then ``measure`` returns ``(value, chunk_values)`` and
            ``baseline`` is ``(value, chunk_values)`` over the same chunks.

    Returns:
        ``(chosen, tried)``: the first candidate that held (``None`` if none did) and every
        re-measured candidate in order.
    """
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"`margin` must be a non-negative number, got {margin!r}")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence!r}")
    k = max(1, min(len(candidates), max_tries if max_tries is not None else len(candidates)))
    z = statistics.NormalDist().inv_cdf(1 - (1 - confidence) / k) if confidence else 0.0
    base_value, base_chunks = baseline if confidence else (baseline, None)
    tried: list[Confirmation[P]] = []
    for point in candidates:
        if max_tries is not None and len(tried) >= max_tries:
            break
        value, chunks = measure(point) if confidence else (measure(point), None)
        drop = metric_drop(base_value, value, higher_is_better=higher_is_better)
        upper = None
        if confidence:
            se = paired_stderr(base_chunks, chunks, higher_is_better=higher_is_better)
            upper = drop + z * se
        held = (drop if upper is None else upper) <= budget - margin
        search_drop = float(point.accuracy_drop)  # type: ignore[attr-defined]
        tried.append(Confirmation(point, search_drop, value, drop, held, upper))
        if held:
            return point, tried
    return None, tried


def front_within(points: Iterable[P], budget: float) -> list[P]:
    """The candidates to confirm, by increasing energy: the points within ``budget`` on the
    search part whose drop there is no larger than that of every cheaper one (the Pareto front
    in (energy, drop), ties in drop included: when the search part cannot tell configurations
    apart, the next more expensive one is still the safer next try). One point per energy."""
    ok = [pt for pt in points if pt.accuracy_drop <= budget]  # type: ignore[attr-defined]
    ok.sort(key=lambda q: (q.energy.total, q.accuracy_drop))  # type: ignore[attr-defined]
    front: list[P] = []
    for pt in ok:
        if not front or (
            pt.accuracy_drop <= front[-1].accuracy_drop  # type: ignore[attr-defined]
            and pt.energy.total > front[-1].energy.total  # type: ignore[attr-defined]
        ):
            front.append(pt)
    return front
