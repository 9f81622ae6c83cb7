"""Second-moment statistics of a layer's input, as data.

Everything the method needs from the activation matrix ``X`` (n features × K samples) is

* the Gram matrix ``G = X Xᵀ = Σ_k x_k x_kᵀ`` (n × n),
* the feature sums ``s = X 1 = Σ_k x_k`` (n,),
* the sample count ``K``.

These are accumulated in float64, batch after batch, so memory is O(n²) whatever K is; the n × K
matrix is never stored. Recording them from a network (forward pre-hooks, the all-reduce under
``torch.distributed``) is :mod:`~lightning_neuronprune.core.recording`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neuronprune.errors import StatisticsError

__all__ = ["JunctionStatistics"]


@dataclass
class JunctionStatistics:
    """Second moments of the n features that a consumer ``nn.Linear`` reads.

    Attributes:
        gram: ``G = Σ_k x_k x_kᵀ``, shape (n, n), float64.
        total: ``s = Σ_k x_k``, shape (n,), float64.
        count: the number of samples K (rows seen by the consumer).
    """

    gram: Tensor
    total: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device | str | None = None) -> JunctionStatistics:
        """Empty statistics for ``n`` features, accumulated in float64 on ``device``."""
        return cls(
            gram=torch.zeros(n, n, dtype=torch.float64, device=device),
            total=torch.zeros(n, dtype=torch.float64, device=device),
            count=0,
        )

    @classmethod
    def from_activations(cls, X: Tensor) -> JunctionStatistics:
        """Statistics of a K × n batch of activations (rows are samples)."""
        stats = cls.zeros(X.shape[-1], X.device)
        stats.update(X)
        return stats

    @property
    def num_features(self) -> int:
        """n, the number of features."""
        return self.gram.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gram.device

    def update(self, x: Tensor) -> None:
        """Add a batch of activations ``x`` of shape (K_b, n): ``G += xᵀx``, ``s += xᵀ1``."""
        x = x.detach().reshape(-1, self.num_features).to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.total.add_(x.sum(0))
        self.count += x.shape[0]

    def mean(self) -> Tensor:
        """The feature means ``μ = s / K``, shape (n,)."""
        self._check_nonempty()
        return self.total / self.count

    def second_moment(self, centered: bool = False) -> Tensor:
        """``G / K`` or, if ``centered``, the covariance ``G / K - μ μᵀ``; shape (n, n), float64."""
        self._check_nonempty()
        M = self.gram / self.count
        if centered:
            mu = self.mean()
            M.sub_(torch.outer(mu, mu))
        S = M + M.T
        del M  # at most three n × n matrices at a time, G included
        return S.div_(2)

    def normalize_(self, tile: int = 1024) -> JunctionStatistics:
        """Turn these statistics, in place, into those of the same moments over one sample:
        ``G ← (G / K + (G / K)ᵀ) / 2`` (the :meth:`second_moment`), ``s ← s / K`` (the
        :meth:`mean`), ``K ← 1``. :meth:`second_moment` (not centered) and :meth:`mean` return the
        same numbers, bit for bit, and ``gram`` can serve as the second moment itself, without
        the copy that :meth:`second_moment` makes (one n × n matrix less). Symmetrised in tiles of
        ``tile`` rows: two ``tile × tile`` temporaries. Returns ``self``.
        """
        self._check_nonempty()
        M, n = self.gram, self.num_features
        M.div_(self.count)
        for i0 in range(0, n, tile):
            i1 = min(i0 + tile, n)
            D = M[i0:i1, i0:i1]
            D.copy_((D + D.T) / 2)
            for j0 in range(i1, n, tile):
                j1 = min(j0 + tile, n)
                avg = (M[i0:i1, j0:j1] + M[j0:j1, i0:i1].T) / 2
                M[i0:i1, j0:j1] = avg
                M[j0:j1, i0:i1] = avg.T
        self.total.div_(self.count)
        self.count = 1
        return self

    def to(self, device: torch.device | str) -> JunctionStatistics:
        """A copy on ``device``."""
        return JunctionStatistics(self.gram.to(device), self.total.to(device), self.count)

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise StatisticsError(
                f"no samples were recorded for these {self.num_features}-feature statistics; "
                "the data iterable was empty or `max_samples` was 0"
            )
