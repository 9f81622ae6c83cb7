"""Choosing the p neurons to keep (Algorithm 2 of Zhang, Davoodi & Hu 2018 and a nested variant).

Two methods, both computed from the Gram matrix ``G = X Xᵀ`` alone:

* ``"svd_qr"`` (the paper): ``G = U Σ² Uᵀ``; QR with column pivoting of ``U_pᵀ`` (p × n); the
  first p pivots are kept (Golub–Klema–Stewart subset selection). It needs one pivoted QR per p.
* ``"qr"`` (nested): greedy pivoted Cholesky of ``G``, which picks the same pivots as QR with
  column pivoting of ``Xᵀ``. The order is nested in p, so one factorisation serves a whole sweep.

When ``affine=True`` the centered covariance replaces ``G``, matching the affine least-squares fit.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_neuronprune.linalg import pivoted_cholesky, pivoted_qr
from lightning_neuronprune.statistics import JunctionStatistics

__all__ = ["METHODS", "Method", "nested_order", "numerical_rank", "select_neurons", "spectrum"]

Method = Literal["svd_qr", "qr"]
METHODS: tuple[str, ...] = ("svd_qr", "qr")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")


def _check_p(p: int, n: int) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= n:
        raise ValueError(
            f"`p` must be an integer in [1, {n}] (the layer has n={n} features), got {p!r}"
        )


def spectrum(
    stats: JunctionStatistics, *, centered: bool = False, moment: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the (normalised) second moment, largest first.

    Args:
        stats: statistics of the n features.
        centered: use the covariance.
        moment: ``stats.second_moment(centered=centered)``, if already computed.

    Returns:
        ``(σ², U)``: eigenvalues (n,) in non-increasing order and eigenvectors (n × n) as columns,
        float64. ``U`` holds the left singular vectors of ``X``.
    """
    M = stats.second_moment(centered=centered) if moment is None else moment
    w, U = torch.linalg.eigh(M)
    return w.flip(0), U.flip(1)


def numerical_rank(
    stats: JunctionStatistics, *, centered: bool = False, eigenvalues: Tensor | None = None
) -> int:
    """rank(X) as the number of singular values above ``n · eps(float32) · σ_max``.

    The tolerance uses float32's epsilon because activations come from float32 networks.
    ``eigenvalues`` (σ², from :func:`spectrum`) saves recomputing them.
    """
    w = eigenvalues if eigenvalues is not None else spectrum(stats, centered=centered)[0]
    s = w.clamp_min(0).sqrt()
    if s[0] == 0:
        return 0
    tol = s.shape[0] * torch.finfo(torch.float32).eps * s[0]
    return int((s > tol).sum().item())


def nested_order(
    stats: JunctionStatistics, *, centered: bool = False, moment: Tensor | None = None
) -> Tensor:
    """The full pivot order of the ``"qr"`` method: keeping ``order[:p]`` is the choice for p.

    Greedy pivoted Cholesky of ``G`` runs until the residual vanishes (the numerical rank r);
    the remaining n - r features, which are linear combinations of the first r, follow in order of
    decreasing residual diagonal, then by index.

    ``moment`` is ``stats.second_moment(centered=centered)``, if already computed.

    Returns:
        (n,) LongTensor permutation of ``range(n)``.
    """
    M = stats.second_moment(centered=centered) if moment is None else moment
    n = M.shape[0]
    fac = pivoted_cholesky(M, rtol=n * torch.finfo(torch.float32).eps)
    head = fac.perm[: fac.rank]
    rest = fac.perm[fac.rank :]  # the other features, in increasing index order
    if rest.numel():
        L = fac.L[:, : fac.rank]
        # Residual diagonal of the trailing features, in original index order.
        pos = torch.empty(n, dtype=torch.long, device=M.device)
        pos[fac.perm] = torch.arange(n, device=M.device)
        resid = M.diagonal()[rest] - (L[pos[rest]] ** 2).sum(1)
        rest = rest[torch.argsort(-resid, stable=True)]
    return torch.cat([head, rest])


def select_neurons(
    stats: JunctionStatistics,
    p: int,
    *,
    method: Method = "svd_qr",
    centered: bool = False,
    order: Tensor | None = None,
    basis: Tensor | None = None,
) -> Tensor:
    """Pick the p features to keep.

    Args:
        stats: statistics of the n features.
        p: how many to keep, ``1 ≤ p ≤ n``.
        method: ``"svd_qr"`` (Algorithm 2) or ``"qr"`` (nested pivoted Cholesky).
        centered: select on the covariance instead of ``G`` (use with the affine fit).
        order: a precomputed :func:`nested_order` for ``method="qr"`` (saves the factorisation).
        basis: precomputed eigenvectors ``U`` from :func:`spectrum` for ``method="svd_qr"``.

    Returns:
        (p,) sorted LongTensor of kept feature indices, on the statistics' device.
    """
    _check_method(method)
    n = stats.num_features
    _check_p(p, n)
    if method == "qr":
        if order is None:
            order = nested_order(stats, centered=centered)
        kept = order[:p]
    else:
        U = basis if basis is not None else spectrum(stats, centered=centered)[1]
        U_p = U[:, :p]
        kept = pivoted_qr(U_p.T.contiguous(), k=p, compute_q=False).perm[:p]
    return torch.sort(kept).values
