"""Pivoted factorizations in pure torch: QR with column pivoting (and pivoted Cholesky).

PyTorch has no QR with column pivoting (pytorch/pytorch#10454), and LAPACK's ``geqp3``
(``scipy.linalg.qr(..., pivoting=True)``) runs on the CPU only. The routines here use torch
operations alone, so they run on the device of their input (CPU or CUDA) and keep its dtype.

* :func:`pivoted_qr` follows LAPACK's blocked ``xGEQP3`` / ``xLAQPS`` step by step on the CPU:
  largest partial column norm first, norms downdated and recomputed when cancellation occurs,
  ties to the first column. On generic matrices it selects the same pivots as
  ``scipy.linalg.qr``; the two can only part at a near-tie, two partial norms equal to within
  rounding. On a GPU its pivots come from the pivoted Cholesky of ``AᵀA``.
* :func:`~lightning_neuronprune.core.cholesky.pivoted_cholesky` (re-exported here) is the greedy
  diagonal-pivoted Cholesky of a PSD Gram matrix.
* The batched subset selection of a whole rank grid,
  :func:`~lightning_neuronprune.core.selection.prefix_qr_pivots`, lives with the selection methods.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_neuronprune.core.cholesky import (
    PivotedCholesky,
    check_matrix,
    check_steps,
    host_pivots,
    pivoted_cholesky,
    swap_views,
)

__all__ = ["PivotedCholesky", "PivotedQR", "pivoted_cholesky", "pivoted_qr"]


_QR_BLOCK = 32
"""Panel width ``nb`` of the blocked pivoted QR (LAPACK's ``xGEQRF`` block size is 32)."""


class PivotedQR(NamedTuple):
    """Result of :func:`pivoted_qr`: ``A[:, perm] = Q @ R``.

    Attributes:
        Q: ``(m, k)`` matrix with orthonormal columns (``(m, 0)`` with ``compute_q=False``).
        R: ``(k, n)`` upper trapezoidal matrix with non-increasing ``|diag(R)|``.
        perm: ``(n,)`` int64 column permutation; its first ``k`` entries are the pivots.
    """

    Q: Tensor
    R: Tensor
    perm: Tensor


def _power_of_two_scale(amax: float, dtype: torch.dtype) -> float:
    """Return ``2**-e`` bringing ``amax`` into ``[0.5, 1)``; scaling by it is exact.

    The exponent is clipped so that the factor itself is representable in ``dtype``.
    """
    if amax == 0.0:
        return 1.0
    e = math.frexp(amax)[1]
    bound = math.frexp(torch.finfo(dtype).max)[1] - 28
    return math.ldexp(1.0, -max(-bound, min(bound, e)))


@torch.no_grad()
def pivoted_qr(A: Tensor, k: int | None = None, *, compute_q: bool = True) -> PivotedQR:
    r"""QR factorization with column pivoting (LAPACK ``xGEQP3``), in torch.

    Computes ``A[:, perm] = Q R`` with ``Q`` (m × r) having orthonormal columns and ``R`` (r × n)
    upper trapezoidal, ``r = min(m, n)``, by the greedy rule of Businger and Golub: step ``i``
    brings to position ``i`` the remaining column with the largest norm once the ``i`` columns
    already chosen are projected out, so ``|R[0, 0]| >= |R[1, 1]| >= ... >= |R[r-1, r-1]|``.

    The contract is that of ``scipy.linalg.qr(A, mode="economic", pivoting=True)``: the same
    Householder reflectors ``H_i = I - τ_i v_i v_iᵀ`` with ``v_i[i] = 1`` (so ``diag(R)`` may be
    negative and ``Q``, ``R`` agree with scipy's to round-off), the same tie rule (the first of
    equal columns in LAPACK's swapped order) and, on generic matrices, the same pivots.

    The algorithm is LAPACK's blocked ``xLAQPS``. Inside a panel of ``nb`` columns starting at
    ``j0``, only the pivot column receives the pending reflectors,
    ``A[i:, i] -= A[i:, j0:i] F[i, :]ᵀ``. The auxiliary ``F = τ Aᵀ v`` (one GEMV per step, updated
    incrementally) gives the new row of ``R``, ``A[i, i+1:] -= A[i, j0:i+1] F[i+1:, :]ᵀ``, and
    the partial norms are downdated from it, ``ν_j² ← ν_j² - A[i, j]²``. The trailing matrix gets
    a single GEMM per panel, ``A[i:, i:] -= V Fᵀ``. When a downdate has lost too much accuracy,
    ``ν_j² <= sqrt(u) ν̂_j²`` with ``ν̂_j`` the last exact value and ``u = ε / 2`` the unit
    roundoff (LAPACK's ``tol3z`` test), the panel is closed and the norm recomputed. ``Q`` is
    formed once, at the end, from the stored reflectors (:func:`torch.linalg.householder_product`).
    The matrix is first scaled by a power of two (exact) so that squared norms cannot overflow.

    **On a GPU** (any device but the CPU) the pivots never leave the device: they come from the
    greedy pivoted Cholesky of ``AᵀA`` formed in float64 (the squared partial column norms are
    its Schur-complement diagonal, so in exact arithmetic the pivots are the same), whose pivot
    step is replayed as a CUDA graph, and ``Q``, ``R`` from the Householder QR (``geqrf``) of
    ``A[:, perm]``, LAPACK's reflectors. Two documented differences from ``geqp3``: exact ties
    go to the lowest column index (not the first in LAPACK's swapped order), and ``perm[k:]``
    lists the other columns in increasing order.

    Args:
        A: ``(m, n)`` float32 or float64 matrix, finite, on any device. It is not modified, and
            the factorization is not differentiable (it runs under :func:`torch.no_grad`).
        k: if given, stop after ``min(k, m, n)`` Householder steps. Then the first ``k`` pivots
            are final (equal to those of the full factorization), ``Q`` is ``(m, k)``, ``R`` is
            the ``(k, n)`` leading row block, ``perm[k:]`` lists the other columns in LAPACK's
            swapped order, and ``A[:, perm] = Q R + E`` with the residual ``E`` orthogonal to
            ``Q`` and ``||E[:, j]|| <= |R[k-1, k-1]|`` for every ``j``.
        compute_q: form ``Q``. With ``False`` (subset selection needs only the pivots) ``Q`` is
            returned empty, ``(m, 0)``, which saves the cost of accumulating the reflectors.

    Returns:
        :class:`PivotedQR` ``(Q, R, perm)``: ``Q`` and ``R`` have the dtype and device of ``A``,
        ``perm`` is int64 on the same device.

    Raises:
        TypeError: if ``A`` is not a tensor.
        ValueError: if ``A`` is not a finite 2-D float32/float64 matrix, or ``k`` is negative.

    Example:
        >>> A = torch.randn(30, 50, dtype=torch.float64)
        >>> Q, R, perm = pivoted_qr(A)
        >>> torch.allclose(A[:, perm], Q @ R)
        True
    """
    amax = check_matrix(A, "A")
    m, n = A.shape
    r = min(m, n)
    steps = check_steps(k, "k", r)
    dtype, device = A.dtype, A.device
    if steps == 0:
        perm = torch.arange(n, dtype=torch.long, device=device)
        return PivotedQR(A.new_zeros((m, 0)), A.new_zeros((0, n)), perm)

    scale = _power_of_two_scale(amax, dtype)
    if not host_pivots(device):
        return _pivoted_qr_gram(A, steps, scale, compute_q)
    nb = _QR_BLOCK
    # One buffer, one row per column of A, so that a single row swap moves everything that
    # follows a column: B[j] = [A[:, j] (m) | F[j, :] (nb) | ν_j² | tol3z ν̂_j²].
    B = torch.empty((n, m + nb + 2), dtype=dtype, device=device)
    Y = B[:, :m]  # Y = Aᵀ: reflectors and R are read from it at the end
    F = B[:, m : m + nb]
    s1 = B[:, m + nb]  # partial column norms squared
    s2 = B[:, m + nb + 1]  # tol3z * (norm squared at the last exact computation), -1 if zero
    torch.mul(A.T, scale, out=Y)
    tol3z = math.sqrt(torch.finfo(dtype).eps / 2)  # sqrt(dlamch('Epsilon')) = sqrt(u)
    torch.linalg.vector_norm(Y, dim=1, out=s1).square_()
    s2.copy_(torch.where(s1 > 0, s1 * tol3z, -1.0))

    perm = list(range(n))
    taus: list[float] = []
    betas: list[float] = []
    pvt = int(torch.argmax(s1).item())
    i = 0
    while i < steps:
        j0 = i
        stop = min(j0 + nb, steps)
        recompute = False
        Yp, Fp = Y[j0:], F[j0:]  # rows of the panel's columns and of the later ones
        while i < stop:
            Bi = B[i]
            if pvt != i:
                swap_views(Bi, B[pvt])
                perm[i], perm[pvt] = perm[pvt], perm[i]
            kk = i - j0
            x = Bi[i:m]  # pivot column A[i:, i]
            if kk:
                # apply the panel's pending reflectors: A[i:, i] -= A[i:, j0:i] F[i, :kk]ᵀ
                x.addmv_(Yp[:kk, i:].T, Bi[m : m + kk], alpha=-1.0)
            tau, beta = _householder(x)  # x = v, with v[0] = 1 until the panel ends
            taus.append(tau)
            betas.append(beta)
            if i + 1 < n:
                Ft = Fp[kk + 1 :]
                f = Ft[:, kk]
                if tau == 0.0:
                    f.zero_()
                else:
                    # F[:, kk] = τ (Aᵀ v - F[:, :kk] (V[:, :kk]ᵀ v)), rows of later columns only
                    w = torch.mv(Yp[:, i:], x)
                    torch.addmv(w[kk + 1 :], Ft[:, :kk], w[:kk], beta=tau, alpha=-tau, out=f)
                # pivot row of R: A[i, i+1:] -= A[i, j0:i+1] F[i+1:, :kk+1]ᵀ
                row = Y[:, i]
                row[i + 1 :].addmv_(Ft[:, : kk + 1], row[j0 : i + 1], alpha=-1.0)
            i += 1
            if i < steps:
                # downdate ν_j² -= A[i-1, j]²; flag (as +inf) the norms that lost accuracy
                a = row[i:]
                s = s1[i:]
                s.addcmul_(a, a, value=-1.0)
                s.masked_fill_(s <= s2[i:], math.inf)
                best, where = torch.max(s, 0)
                if best.item() == math.inf:
                    recompute = True
                    break
                pvt = i + int(where.item())
        Y.diagonal()[j0:i] = torch.tensor(betas[j0:i], dtype=dtype, device=device)
        if i < steps:
            # A[i:, i:] -= V Fᵀ for the panel's kb reflectors (one GEMM)
            Y[i:, i:].addmm_(F[i:, : i - j0], Y[j0:i, i:], alpha=-1.0)
        if recompute:
            flagged = torch.nonzero(torch.isinf(s1[i:])).squeeze(1).add_(i)
            _recompute_norms(Y, s1, s2, flagged, i, tol3z)
            pvt = i + int(torch.argmax(s1[i:]).item())

    if compute_q:
        tau_t = torch.tensor(taus, dtype=dtype, device=device)
        Q = torch.linalg.householder_product(Y[:steps].T, tau_t)
    else:  # no reflector accumulation: selection needs only the pivots
        Q = A.new_empty((m, 0))
    R = Y[:, :steps].tril().T.contiguous().mul_(1.0 / scale)
    return PivotedQR(Q, R, torch.tensor(perm, dtype=torch.long, device=device))


def _pivoted_qr_gram(A: Tensor, steps: int, scale: float, compute_q: bool) -> PivotedQR:
    r"""The device path of :func:`pivoted_qr`: pivots from ``AᵀA``, factors from Householder QR.

    Step ``i`` of the QR with column pivoting picks the column of largest norm once the chosen
    ones are projected out; that squared norm is the Schur-complement diagonal of the Gram matrix
    ``AᵀA``, so the greedy pivoted Cholesky of ``AᵀA`` (:func:`_pivoted_cholesky_device`, whose
    pivots never leave the device) picks the same columns. The Gram matrix is formed in float64 (one
    GEMM), which keeps the partial norms as accurate as LAPACK's downdated ones on the matrices
    we factor. ``Q`` and ``R`` then come from the unpivoted Householder QR of ``A[:, perm]``
    (``geqrf``, LAPACK's reflectors), the same factors as ``geqp3`` given the same pivots.
    """
    m, n = A.shape
    A64 = A.to(torch.float64) * scale
    chol = pivoted_cholesky(A64.T @ A64, k=steps, rtol=0.0)
    perm = chol.perm
    a, tau = torch.geqrf(A.index_select(1, perm))
    R = a[:steps].triu()
    Q = (
        torch.linalg.householder_product(a[:, :steps], tau[:steps])
        if compute_q
        else A.new_empty((m, 0))
    )
    return PivotedQR(Q, R, perm)


def _recompute_norms(Y: Tensor, s1: Tensor, s2: Tensor, cols: Tensor, i: int, tol3z: float) -> None:
    """Recompute the partial norms ``s1[j] = ||Y[j, i:]||²`` of the columns ``j`` in ``cols``.

    Also resets the reference ``s2[j] = tol3z * s1[j]`` (``-1`` for a zero column, which is never
    flagged again: a zero column stays zero under reflections).
    """
    nrm = torch.linalg.vector_norm(Y[cols, i:], dim=1).square_()
    s1[cols] = nrm
    s2[cols] = torch.where(nrm > 0, nrm * tol3z, -1.0)


def _householder(x: Tensor) -> tuple[float, float]:
    """Elementary reflector of LAPACK ``xLARFG``, in place.

    Finds ``H = I - τ v vᵀ`` with ``v = [1, x[1:] / (α - β)]`` such that
    ``H [α, x[1:]] = [β, 0, ..., 0]``, where ``α = x[0]``, ``β = -sign(α) ||x||`` and
    ``τ = (β - α) / β``. ``x`` is overwritten by ``v`` (so ``x[0] = 1``). When ``x[1:] = 0``,
    ``τ = 0`` and ``β = α`` (``H = I``).

    Args:
        x: ``(ℓ,)`` view of the column to reduce.

    Returns:
        ``(τ, β)`` as Python floats.
    """
    head = x[0]
    alpha = head.item()
    if x.shape[0] == 1:
        head.fill_(1.0)
        return 0.0, alpha
    xnorm = torch.linalg.vector_norm(x[1:]).item()
    head.fill_(1.0)
    if xnorm == 0.0:
        return 0.0, alpha
    h = math.hypot(alpha, xnorm)
    beta = -h if alpha >= 0.0 else h
    tau = (beta - alpha) / beta
    tail = x[1:]
    denom = alpha - beta
    if abs(denom) >= torch.finfo(x.dtype).tiny:
        tail.mul_(1.0 / denom)
    else:
        tail.div_(denom)
    return tau, beta
