"""Least-squares re-fit of the consumer's weights (Eq. 6 of Zhang, Davoodi & Hu 2018).

The dropped features are approximated from the kept ones, ``X ≈ T X_p`` with

    T = X X_pᵀ (X_p X_pᵀ + λ I)⁻¹ = G[:, S] (G[S, S] + λ I)⁻¹          (n × p)

and the consumer's weight becomes ``W_p = W T`` (m × p). In the **affine** variant the fit has an
intercept, ``X ≈ T X_p + c 1ᵀ``, which uses the covariance ``C`` instead of ``G``:

    T = C[:, S] (C[S, S] + λ I)⁻¹,   c = μ - T μ_S,   b_p = b + W c.

All of it is computed from :class:`~lightning_neuronprune.core.statistics.JunctionStatistics`, in
float64, on the statistics' device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_neuronprune.core.statistics import JunctionStatistics

__all__ = [
    "Reconstruction",
    "least_squares_transform",
    "reconstruct_consumer",
    "solve_psd",
    "solve_psd_cholesky",
    "solve_psd_pinv",
]


class Reconstruction(NamedTuple):
    """The map from kept to all features: ``x ≈ T x_S + c``.

    Attributes:
        T: (n × p) float64.
        c: (n,) float64 intercept, or ``None`` when the fit has none (not affine).
    """

    T: Tensor
    c: Tensor | None


def solve_psd(A: Tensor, B: Tensor, *, rtol: float | None = None) -> Tensor:
    """Solve ``Y A = B`` for a symmetric positive semi-definite ``A``, i.e. ``Y = B A⁺``.

    A Cholesky solve is tried first. When ``A`` is singular or too ill-conditioned for it (dead or
    duplicate neurons), the pseudo-inverse from ``eigh`` is used instead, discarding eigenvalues
    below ``rtol · max eigenvalue``, so that the result is always finite.

    Args:
        A: (p × p) symmetric PSD.
        B: (n × p).
        rtol: eigenvalue cut-off relative to the largest; defaults to ``p · eps(dtype)``.

    Returns:
        Y: (n × p).
    """
    Y, ok = solve_psd_cholesky(A, B, rtol=rtol)
    if bool(ok):
        return Y
    return solve_psd_pinv(A, B, rtol=rtol)


def _equilibration(A: Tensor) -> Tensor:
    """Jacobi scaling ``d = diag(A)^(-1/2)`` (floored), which keeps the Cholesky test meaningful
    across feature scales."""
    eps = torch.finfo(A.dtype).eps
    scale = A.diagonal().abs().amax().clamp_min(torch.finfo(A.dtype).tiny)
    return A.diagonal().clamp_min(scale * eps).rsqrt()


def solve_psd_cholesky(A: Tensor, B: Tensor, *, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """The Cholesky half of :func:`solve_psd`, with no host synchronisation.

    Returns:
        ``(Y, ok)``: ``ok`` is a 0-dim bool tensor on ``A``'s device, false when ``A`` is
        singular or its equilibrated Cholesky pivots show near-singularity (smallest squared pivot
        at most ``rtol`` times the largest); then ``Y`` must not be used and
        :func:`solve_psd_pinv` gives the answer.
    """
    p = A.shape[0]
    if p == 0:
        return B.new_zeros(B.shape[0], 0), torch.ones((), dtype=torch.bool, device=A.device)
    rtol = p * torch.finfo(A.dtype).eps if rtol is None else rtol
    d = _equilibration(A)
    L, info = torch.linalg.cholesky_ex((A * d[:, None]).mul_(d[None, :]))  # one p × p temporary
    diag_L = L.diagonal()
    ok = (info == 0) & (diag_L.amin().square() > rtol * diag_L.amax().square())
    Y_eq = torch.cholesky_solve((B * d).T, L).T
    return Y_eq.mul_(d), ok  # in place: one (n × p) temporary fewer


def solve_psd_pinv(A: Tensor, B: Tensor, *, rtol: float | None = None) -> Tensor:
    """The pseudo-inverse half of :func:`solve_psd`: ``Y = B A⁺`` from ``eigh``, eigenvalues
    below ``rtol`` times the largest discarded (always finite)."""
    p = A.shape[0]
    if p == 0:
        return B.new_zeros(B.shape[0], 0)
    rtol = p * torch.finfo(A.dtype).eps if rtol is None else rtol
    d = _equilibration(A)
    w, V = torch.linalg.eigh(A * d[:, None] * d[None, :])
    keep = w > rtol * w.max().clamp_min(0)
    w_inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    Y_eq = ((B * d) @ V) * w_inv @ V.T
    return Y_eq * d


def least_squares_transform(
    stats: JunctionStatistics,
    kept: Tensor,
    *,
    affine: bool = False,
    ridge: float = 0.0,
    moment: Tensor | None = None,
    check: bool = True,
) -> Reconstruction | tuple[Reconstruction, Tensor]:
    """Compute ``T`` (and ``c``) of Eq. 6 for the kept features ``S``.

    Args:
        stats: statistics of the n features.
        kept: (p,) indices of the kept features.
        affine: fit an intercept (uses the covariance instead of the raw second moment).
        ridge: λ ≥ 0, added to the diagonal of the normal matrix, relative to its mean diagonal.
        moment: ``stats.second_moment(centered=affine)``, if already computed (a sweep computes
            it once for every p).
        check: resolve a singular normal matrix at once (one host synchronisation). With
            ``False`` the Cholesky result and its ``ok`` flag are returned, ``((T, c), ok)``,
            for callers that batch the checks (see :func:`solve_psd_cholesky`).

    Returns:
        :class:`Reconstruction` with ``T`` of shape (n × p) and ``c`` of shape (n,) or ``None``,
        float64. Rows of ``T`` for kept features are the identity up to round-off.
    """
    if ridge < 0:
        raise ValueError(f"`ridge` must be non-negative, got {ridge!r}")
    kept = kept.to(stats.device)
    M = stats.second_moment(centered=affine) if moment is None else moment
    B = M.index_select(1, kept)
    A = B.index_select(0, kept)
    if ridge > 0:
        A = A + ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    if check:
        T, ok = solve_psd(A, B), None
    else:
        T, ok = solve_psd_cholesky(A, B)
    c = stats.mean() - T @ stats.mean()[kept] if affine else None
    rec = Reconstruction(T, c)
    return rec if check else (rec, ok)


def reconstruct_consumer(
    weight: Tensor, bias: Tensor | None, rec: Reconstruction
) -> tuple[Tensor, Tensor | None]:
    """New consumer parameters ``W_p = W T`` and ``b_p = b + W c``.

    Args:
        weight: W, (m × n).
        bias: b, (m,) or ``None``.
        rec: the reconstruction of the n features from the p kept ones.

    Returns:
        ``(W_p, b_p)`` in the dtype and on the device of ``weight``; ``b_p`` is ``None`` only when
        ``bias`` is ``None`` and the fit has no intercept.
    """
    W = weight.detach().to(rec.T.device, torch.float64)
    W_p = W @ rec.T
    b_p: Tensor | None = None
    if bias is not None or rec.c is not None:
        b = bias.detach().to(W) if bias is not None else W.new_zeros(W.shape[0])
        if rec.c is not None:
            b = b + W @ rec.c
        b_p = b.to(weight.device, weight.dtype)
    return W_p.to(weight.device, weight.dtype), b_p
