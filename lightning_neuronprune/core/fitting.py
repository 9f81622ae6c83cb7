"""One fit step for a junction: select the p features to keep, then re-fit the consumer.

Every place that reduces a junction (the rank sweep, the joint search, :func:`reduce_junction`)
goes through :class:`JunctionFitter`:

1. selection (:mod:`.selection`, :mod:`.linalg`): the kept set ``S`` (p of n features);
2. least squares (:mod:`.reconstruction`, Eq. 6): ``T = G[:, S] G[S, S]⁻¹`` and the consumer's
   new weight ``W_p = W T`` (``b_p = b + W c`` with the affine fit).

The fitter computes once what every p shares (the second moment, its eigenvectors ``U`` or the
nested pivot order, the numerical rank), and for ``"svd_qr"`` it selects a whole grid of p at
once (:func:`~lightning_neuronprune.core.selection.prefix_qr_pivots`). Everything stays on the
statistics' device.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_neuronprune.core.linalg import pivoted_qr
from lightning_neuronprune.core.reconstruction import (
    Reconstruction,
    least_squares_transform,
    reconstruct_consumer,
)
from lightning_neuronprune.core.selection import (
    METHODS,
    Method,
    check_p,
    nested_order,
    numerical_rank,
    output_order,
    prefix_qr_pivots,
    spectrum,
)
from lightning_neuronprune.core.statistics import JunctionStatistics

__all__ = ["CPU_BATCHED_MAX_FEATURES", "Fit", "FitOptions", "JunctionFitter", "fit_junction"]

#: On the CPU, the widest layer whose rank grid is selected in one batched loop; wider layers
#: take one blocked pivoted QR per p. On 2 cores the batched loop was 2× faster at n = 512, even
#: at n = 1024 and 5× slower at n = 2048 (its batched GEMVs read ``n Σ p²/2`` words).
CPU_BATCHED_MAX_FEATURES = 768


@dataclass(frozen=True)
class FitOptions:
    """How a junction is fitted.

    Attributes:
        method: ``"svd_qr"`` (the paper's Algorithm 2), ``"qr"`` (nested pivoted Cholesky) or
            ``"output"`` (output-aware greedy on the consumer's weight and ``G``).
        affine: fit an intercept, folded into the consumer's bias.
        ridge: relative ridge parameter λ ≥ 0 of the least-squares fit.

    Raises:
        ValueError: naming the argument and the bad value.
    """

    method: Method = "svd_qr"
    affine: bool = False
    ridge: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.affine, bool):
            raise ValueError(f"`affine` must be a bool, got {self.affine!r}")
        r = self.ridge
        if (
            isinstance(r, bool)
            or not isinstance(r, numbers.Real)
            or not (math.isfinite(r) and r >= 0)
        ):
            raise ValueError(f"`ridge` must be a finite number >= 0, got {r!r}")


class Fit(NamedTuple):
    """The reduction of one junction at one p.

    Attributes:
        kept: (p,) sorted int64 indices of the kept features.
        weight: ``W_p``, (m × p), in the consumer's dtype and on its device.
        bias: ``b_p``, (m,), or ``None`` when the consumer has no bias and the fit no intercept.
        ok: 0-dim bool tensor: the Cholesky solve of Eq. 6 was sound. Always true for a checked
            fit; an unchecked one (``check=False``) with ``ok`` false must be redone with
            ``check=True``.
    """

    kept: Tensor
    weight: Tensor
    bias: Tensor | None
    ok: Tensor


class JunctionFitter:
    """Select → least squares for one junction, at any p, sharing the work that all p share.

    Args:
        stats: statistics of the consumer's n input features.
        weight: the consumer's weight ``W``, (m × n).
        bias: the consumer's bias, (m,), or ``None``.
        options: the :class:`FitOptions`.
        moment: ``stats.second_moment(centered=options.affine)`` if already computed; it is used
            as it is, not copied (e.g. the ``gram`` of statistics after
            :meth:`~lightning_neuronprune.core.statistics.JunctionStatistics.normalize_`).

    Attributes:
        moment: the second moment (covariance with the affine fit), (n × n) float64.
    """

    def __init__(
        self,
        stats: JunctionStatistics,
        weight: Tensor,
        bias: Tensor | None,
        options: FitOptions | None = None,
        moment: Tensor | None = None,
    ) -> None:
        self.stats = stats
        self.weight = weight
        self.bias = bias
        self.options = options or FitOptions()
        centered = self.options.affine
        self.moment = stats.second_moment(centered=centered) if moment is None else moment
        self._basis: Tensor | None = None
        self._order: Tensor | None = None
        self._sigma2: Tensor | None = None
        self._order_steps = 0
        if self.options.method == "svd_qr":
            self._sigma2, self._basis = spectrum(stats, centered=centered, moment=self.moment)
        elif self.options.method == "qr":
            self._order = nested_order(stats, centered=centered, moment=self.moment)
            self._order_steps = self.num_features
        # "output": the greedy order is computed in `prepare`, as far as the largest p asked
        self._kept: dict[int, Tensor] = {}

    @functools.cached_property
    def rank(self) -> int:
        """The numerical rank of the features: the largest p worth sweeping (at least 1)."""
        if self._sigma2 is None:
            self._sigma2 = torch.linalg.eigvalsh(self.moment).flip(0)
        centered = self.options.affine
        return max(1, numerical_rank(self.stats, centered=centered, eigenvalues=self._sigma2))

    @property
    def num_features(self) -> int:
        """n, the number of features."""
        return self.stats.num_features

    def prepare(self, ps: Iterable[int]) -> None:
        """Select the kept sets of many p at once.

        ``svd_qr`` selects the whole grid in one batched loop
        (:func:`~lightning_neuronprune.core.selection.prefix_qr_pivots`), except on the CPU for
        layers
        wider than :data:`CPU_BATCHED_MAX_FEATURES`, where one blocked pivoted QR per p moves
        less memory (measured in docs/RESULTS.md); both give LAPACK's pivots.
        """
        todo = sorted({p for p in ps if p not in self._kept}, reverse=True)
        for p in todo:
            check_p(p, self.num_features)
        if self.options.method == "svd_qr" and self._basis is None and todo:
            self._sigma2, self._basis = spectrum(
                self.stats, centered=self.options.affine, moment=self.moment
            )
        U = self._basis
        if U is not None and U.device.type == "cpu" and U.shape[0] > CPU_BATCHED_MAX_FEATURES:
            for p in todo:  # one blocked QR with column pivoting per p (LAPACK's xLAQPS)
                pivots = pivoted_qr(U[:, :p].T, k=p, compute_q=False).perm[:p]
                self._kept[p] = torch.sort(pivots).values
        elif U is not None:
            for p, pivots in zip(todo, prefix_qr_pivots(U, todo), strict=True):
                self._kept[p] = torch.sort(pivots).values
        else:
            if todo and todo[0] > self._order_steps:  # "output": one greedy pass for the grid
                self._order = output_order(
                    self.stats, self.weight, centered=self.options.affine, steps=todo[0],
                    moment=self.moment,
                )  # fmt: skip
                self._order_steps = todo[0]
            for p in todo:
                self._kept[p] = torch.sort(self._order[:p]).values  # type: ignore[index]

    def release(self) -> None:
        """Free the eigenvectors (n × n) once the grid is selected; a later :meth:`prepare` of
        a new p computes them again."""
        self._basis = None

    def kept(self, p: int) -> Tensor:
        """(p,) sorted indices of the features kept at p."""
        if p not in self._kept:
            self.prepare([p])
        return self._kept[p]

    def fit(self, p: int, *, check: bool = True) -> Fit:
        """The kept set and the consumer's new parameters at p.

        Args:
            p: features to keep, ``1 ≤ p ≤ n``.
            check: resolve a singular normal matrix at once (one host synchronisation). With
                ``False`` there is none, and :attr:`Fit.ok` says whether to redo the fit.
        """
        kept = self.kept(p)
        rec, ok = self.transform(kept, check=check)
        W_p, b_p = reconstruct_consumer(self.weight, self.bias, rec)
        return Fit(kept, W_p, b_p, ok)

    def transform(self, kept: Tensor, *, check: bool = True) -> tuple[Reconstruction, Tensor]:
        """Eq. 6's least-squares transform for the kept set (sorted (p,) indices), and a 0-d
        bool: whether its normal matrix was sound (always true with ``check``, which resolves a
        singular one at once, at the cost of one host synchronisation)."""
        o = self.options
        if check:
            rec = least_squares_transform(
                self.stats, kept, affine=o.affine, ridge=o.ridge, moment=self.moment
            )
            return rec, torch.ones((), dtype=torch.bool, device=kept.device)
        return least_squares_transform(
            self.stats, kept, affine=o.affine, ridge=o.ridge, moment=self.moment, check=False
        )


def fit_junction(
    stats: JunctionStatistics,
    weight: Tensor,
    bias: Tensor | None,
    p: int,
    options: FitOptions | None = None,
    moment: Tensor | None = None,
) -> Fit:
    """Select p features and re-fit the consumer: the one fit step, for a single p.

    Args:
        stats: statistics of the consumer's n input features.
        weight: the consumer's weight ``W``, (m × n).
        bias: the consumer's bias, (m,), or ``None``.
        p: features to keep.
        options: the :class:`FitOptions`.
        moment: the second moment, if already computed (see :class:`JunctionFitter`).

    Returns:
        The checked :class:`Fit`.
    """
    return JunctionFitter(stats, weight, bias, options, moment).fit(p)
