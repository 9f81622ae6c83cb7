"""Least-squares re-fit of the consumer's weights (Eq. 6 of Zhang, Davoodi & Hu 2018).

The dropped features are approximated from the kept ones, ``X ≈ T X_p`` with

    T = X X_pᵀ (X_p X_pᵀ + λ I)⁻¹ = G[:, S] (G[S, S] + λ I)⁻¹          (n × p)

and the consumer's weight becomes ``W_p = W T`` (m × p). In the **affine** variant the fit has an
intercept, ``X ≈ T X_p + c 1ᵀ``, which uses the covariance ``C`` instead of ``G``:

    T = C[:, S] (C[S, S] + λ I)⁻¹,   c = μ - T μ_S,   b_p = b + W c.

All of it is computed from :class:`~lightning_neuronprune.statistics.JunctionStatistics`, in
float64, on the statistics' device.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_neuronprune.errors import NumericalWarning
from lightning_neuronprune.statistics import JunctionStatistics

__all__ = ["Reconstruction", "least_squares_transform", "reconstruct_consumer", "solve_psd"]


class Reconstruction(NamedTuple):
    """The map from kept to all features: ``x ≈ T x_S + c``.

    Attributes:
        T: (n × p) float64.
        c: (n,) float64 intercept (zeros unless the fit is affine).
    """

    T: Tensor
    c: Tensor


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
    p = A.shape[0]
    if p == 0:
        return B.new_zeros(B.shape[0], 0)
    eps = torch.finfo(A.dtype).eps
    rtol = p * eps if rtol is None else rtol
    scale = A.diagonal().abs().max()
    if scale == 0:
        return torch.zeros_like(B)
    # Jacobi equilibration keeps the Cholesky test meaningful across feature scales.
    d = A.diagonal().clamp_min(scale * eps).rsqrt()
    A_eq = A * d[:, None] * d[None, :]
    L, info = torch.linalg.cholesky_ex(A_eq)
    if info.item() == 0:
        diagL = L.diagonal()
        # Reject a factorisation whose pivots show near-singularity: use the pseudo-inverse.
        if diagL.min() ** 2 > rtol * diagL.max() ** 2:
            Y_eq = torch.cholesky_solve((B * d).T, L).T
            return Y_eq * d
    w, V = torch.linalg.eigh(A_eq)
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
) -> Reconstruction:
    """Compute ``T`` (and ``c``) of Eq. 6 for the kept features ``S``.

    Args:
        stats: statistics of the n features.
        kept: (p,) indices of the kept features.
        affine: fit an intercept (uses the covariance instead of the raw second moment).
        ridge: λ ≥ 0, added to the diagonal of the normal matrix, relative to its mean diagonal.

    Returns:
        :class:`Reconstruction` with ``T`` of shape (n × p) and ``c`` of shape (n,), float64.
        Rows of ``T`` for kept features are the identity up to round-off.
    """
    if ridge < 0:
        raise ValueError(f"`ridge` must be non-negative, got {ridge!r}")
    kept = kept.to(stats.device)
    M = stats.second_moment(centered=affine)
    A = M[kept][:, kept]
    B = M[:, kept]
    if ridge > 0:
        A = A + ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    T = solve_psd(A, B)
    if not torch.isfinite(T).all():  # pragma: no cover - solve_psd is built to prevent this
        warnings.warn(
            "least-squares transform was not finite; replaced by 0", NumericalWarning, stacklevel=2
        )
        T = torch.nan_to_num(T, nan=0.0, posinf=0.0, neginf=0.0)
    if affine:
        mu = stats.mean()
        c = mu - T @ mu[kept]
    else:
        c = torch.zeros(M.shape[0], dtype=M.dtype, device=M.device)
    return Reconstruction(T, c)


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
        ``bias`` is ``None`` and ``c`` is zero.
    """
    W = weight.detach().to(rec.T.device, torch.float64)
    W_p = W @ rec.T
    b_p: Tensor | None = None
    if bias is not None or bool(rec.c.any()):
        b = bias.detach().to(W) if bias is not None else W.new_zeros(W.shape[0])
        b_p = (b + W @ rec.c).to(weight.device, weight.dtype)
    return W_p.to(weight.device, weight.dtype), b_p
