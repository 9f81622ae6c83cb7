"""Pivoted factorizations in pure torch: QR with column pivoting and pivoted Cholesky.

PyTorch has no QR with column pivoting (pytorch/pytorch#10454), and LAPACK's ``geqp3``
(``scipy.linalg.qr(..., pivoting=True)``) runs on the CPU only. The routines here use torch
operations alone, so they run on the device of their input (CPU or CUDA) and keep its dtype.

* :func:`pivoted_qr` follows LAPACK's blocked ``xGEQP3`` / ``xLAQPS`` step by step: largest
  partial column norm first, norms downdated and recomputed when cancellation occurs, ties to the
  first column. On generic matrices it selects the same pivots as ``scipy.linalg.qr``; the two can
  only part at a near-tie, two partial norms equal to within rounding.
* :func:`pivoted_cholesky` is the greedy diagonal-pivoted Cholesky of a PSD Gram matrix
  ``G = X Xᵀ`` (LAPACK ``xPSTRF``); in exact arithmetic its pivots are those of the pivoted QR of
  ``Xᵀ``, so it selects neurons from second moments alone.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PivotedCholesky", "PivotedQR", "pivoted_cholesky", "pivoted_qr", "prefix_qr_pivots"]

_QR_BLOCK = 32
"""Panel width ``nb`` of the blocked pivoted QR (LAPACK's ``xGEQRF`` block size is 32)."""

_CHOLESKY_BLOCK = 128
"""Panel width of the blocked pivoted Cholesky."""

_SUPPORTED_DTYPES = (torch.float32, torch.float64)

_CPU_BATCH_BYTES = 256 * 2**20
"""Working memory of one chunk of :func:`prefix_qr_pivots` on the CPU."""

_DEVICE_BATCH_FRACTION = 0.25
"""Share of the free device memory that one chunk of :func:`prefix_qr_pivots` may take."""


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


class PivotedCholesky(NamedTuple):
    """Result of :func:`pivoted_cholesky`: ``G[perm][:, perm] ≈ L @ L.T``.

    Attributes:
        L: ``(n, rank)`` lower trapezoidal factor, rows in pivot order.
        perm: ``(n,)`` int64 permutation; its first ``rank`` entries are the pivots.
        rank: number of pivots taken (columns of ``L``).
    """

    L: Tensor
    perm: Tensor
    rank: int


def _check_matrix(A: Tensor, name: str) -> float:
    """Validate a 2-D, finite, float32/float64 tensor and return ``max |A|`` (0 when empty).

    Raises:
        TypeError: if ``A`` is not a tensor.
        ValueError: naming the shape or dtype when ``A`` is not a finite real floating matrix.
    """
    if not isinstance(A, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D matrix, got shape {tuple(A.shape)}")
    if A.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"`{name}` must have dtype torch.float32 or torch.float64, got {A.dtype} "
            f"(shape {tuple(A.shape)})"
        )
    if A.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(A)  # one pass, no temporary; NaN propagates
    amax = max(-lo.item(), hi.item())
    if not math.isfinite(amax):
        raise ValueError(
            f"`{name}` must be finite, but it holds NaN or infinite entries "
            f"(shape {tuple(A.shape)}, dtype {A.dtype})"
        )
    return amax


def _check_steps(k: int | None, name: str, limit: int) -> int:
    """Return the number of steps ``min(k, limit)`` (``limit`` when ``k`` is None).

    Raises:
        ValueError: if ``k`` is not None and not a non-negative integer.
    """
    if k is None:
        return limit
    try:
        steps = operator.index(k)
    except TypeError:
        steps = -1
    if isinstance(k, bool) or steps < 0:
        raise ValueError(f"`{name}` must be a non-negative int or None, got {k!r}")
    return min(steps, limit)


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
    amax = _check_matrix(A, "A")
    m, n = A.shape
    r = min(m, n)
    steps = _check_steps(k, "k", r)
    dtype, device = A.dtype, A.device
    if steps == 0:
        perm = torch.arange(n, dtype=torch.long, device=device)
        return PivotedQR(A.new_zeros((m, 0)), A.new_zeros((0, n)), perm)

    scale = _power_of_two_scale(amax, dtype)
    if not _host_pivots(device):
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
                _swap(Bi, B[pvt])
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


@torch.no_grad()
def pivoted_cholesky(
    G: Tensor, k: int | None = None, *, rtol: float | None = None
) -> PivotedCholesky:
    r"""Greedy diagonal-pivoted Cholesky factorization of a symmetric PSD matrix, in torch.

    Step ``i`` picks the remaining index ``p`` with the largest Schur-complement diagonal
    ``d_p = G[p, p] - Σ_{c<i} L[p, c]²`` (exact ties go to the lowest index of ``G``) and sets
    ``L[:, i] = (G[:, p] - L[:, :i] L[p, :i]ᵀ) / sqrt(d_p)``. With ``G = X Xᵀ`` (X: n × K),
    ``d_p`` is the squared norm of row ``p`` of ``X`` after projecting out the rows already chosen,
    so in exact arithmetic the pivots are those of the QR with column pivoting of ``Xᵀ``
    (:func:`pivoted_qr`), and they are nested: the first ``k`` pivots do not depend on ``k``.

    The factorization stops after ``k`` steps, or as soon as the largest remaining diagonal is at
    most ``rtol * max(diag(G))`` (LAPACK ``xPSTRF``'s rule), whichever comes first. It is blocked
    and right-looking like ``xPSTRF``: inside a panel of ``nb`` pivots starting at ``c0``, the
    pivot row and column are swapped to the front of the trailing block ``W[i:, i:]`` and each new
    column of ``L`` costs one GEMV against the panel,
    ``L[i:, i] = (W[i, i:] - L[i:, c0:i] L[i, c0:i]ᵀ) / sqrt(d_i)``; the upper triangle of the
    trailing Schur complement is updated once per panel with tiled GEMMs,
    ``W[i:, i:] -= L[i:, c0:i] L[i:, c0:i]ᵀ`` (about half the flops of a full GEMM).

    Contract, with ``P = perm`` and ``ρ = rank``:

    * ``L`` is ``(n, ρ)``, rows in pivot order, lower trapezoidal, ``L[i, i] = sqrt(d_{P[i]}) > 0``
      non-increasing (up to round-off);
    * ``G[P[:, None], P] = L @ L.T + S``, where ``S`` is zero except its trailing
      ``(n - ρ) × (n - ρ)`` block, the Schur complement of the pivots, which is PSD with diagonal at
      most ``rtol * max(diag(G))`` when the ``rtol`` rule stopped the factorization;
    * in particular ``G[P[:ρ, None], P] = (L @ L.T)[:ρ]`` up to round-off.

    Args:
        G: ``(n, n)`` symmetric positive semi-definite float32 or float64 matrix. Asymmetry up to
            ``sqrt(eps) * max|G|`` (round-off in accumulated statistics) is accepted and removed by
            using ``(G + Gᵀ) / 2``. It is not modified, and the factorization is not
            differentiable (it runs under :func:`torch.no_grad`).
        k: maximal number of pivots (default ``n``); values above ``n`` are clipped to ``n``.
        rtol: relative stopping tolerance, default ``n * eps`` of the dtype.

    Returns:
        :class:`PivotedCholesky` ``(L, perm, rank)``; ``L`` has the dtype and device of ``G``,
        ``perm`` is int64 on the same device, ``perm[rank:]`` lists the other indices in
        increasing order (and ``L[rank:]`` follows it).

    Raises:
        ValueError: if ``G`` is not a finite, square, symmetric float32/float64 matrix, or ``k`` or
            ``rtol`` is negative.

    Example:
        >>> X = torch.randn(40, 10, dtype=torch.float64)
        >>> L, perm, rank = pivoted_cholesky(X @ X.T)
        >>> rank
        10
    """
    amax = _check_matrix(G, "G")
    n = G.shape[0]
    if G.shape[1] != n:
        raise ValueError(f"`G` must be square, got shape {tuple(G.shape)}")
    steps = _check_steps(k, "k", n)
    if rtol is None:
        rtol = n * torch.finfo(G.dtype).eps
    elif isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not rtol >= 0.0:
        raise ValueError(f"`rtol` must be a non-negative float or None, got {rtol!r}")
    W = _symmetrized(G, amax)  # the trailing block W[i:, i:] is the Schur complement
    if not _host_pivots(G.device):
        return _pivoted_cholesky_device(W, steps, rtol)
    device = G.device

    nb = min(_CHOLESKY_BLOCK, max(steps, 1))
    L = G.new_zeros((n, steps))  # rows in the current arrangement
    # panel buffer, one column per index of G, so that a single column swap moves all:
    # P[:nb] = the panel's columns of L, transposed; P[nb] = d (Schur diagonal); P[nb+1] = index
    P = G.new_zeros((nb + 2, n))
    d, orig = P[nb], P[nb + 1]
    d.copy_(W.diagonal())
    orig.copy_(torch.arange(n, device=device))
    tol = rtol * max(d.max().item(), 0.0) if n else 0.0
    i = 0
    done = False
    while i < steps and not done:
        c0 = i
        stop = min(c0 + nb, steps)
        if c0:
            P[:nb].zero_()
        while i < stop:
            ds = d[i:]
            best = ds.max()
            dmax = best.item()  # on the CPU a read is free (see _pivoted_cholesky_device)
            if not dmax > tol:
                done = True
                break
            # exact ties go to the lowest original index (the swaps permute the arrangement)
            p = i + int(torch.where(ds == best, orig[i:], float(n)).argmin().item())
            if p != i:
                # symmetric swap of i and p in the upper triangle of W (LAPACK xPSTRF)
                _swap(W[i, p + 1 :], W[p, p + 1 :])
                _swap(W[i, i + 1 : p], W[i + 1 : p, p])
                _swap(P[:, i], P[:, p])
                if c0:
                    _swap(L[i, :c0], L[p, :c0])
            j = i - c0
            root = math.sqrt(dmax)
            lj = P[j, i:]
            # L[i:, i] = (W[i, i:] - L[i:, c0:i] L[i, c0:i]ᵀ) / sqrt(d_i)
            torch.addmv(W[i, i:], P[:j, i:].T, P[:j, i], alpha=-1.0, out=lj)
            lj.mul_(1.0 / root)
            lj[0] = root
            i += 1
            below = P[j, i:]
            d[i:].addcmul_(below, below, value=-1.0)
        kb = i - c0
        if kb:
            L[:, c0:i] = P[:kb].T
        if i < steps and not done:
            _update_upper(W, P[:kb], i)

    rank = i
    perm = orig.to(torch.long)
    if rank < n:  # list the indices left out in increasing order
        rows = torch.cat((torch.arange(rank, device=device), torch.argsort(perm[rank:]) + rank))
        perm = perm[rows]
        L = L[:, :rank].index_select(0, rows)
    else:
        L = L[:, :rank]
    return PivotedCholesky(L, perm, rank)


def _pivoted_cholesky_device(W: Tensor, steps: int, rtol: float) -> PivotedCholesky:
    r"""The device path of :func:`pivoted_cholesky`: no host synchronisation per pivot.

    The same greedy algorithm, arranged for accelerators: indices are never swapped. ``W``
    (the symmetric Schur complement, updated once per panel with one GEMM,
    ``W -= L_c L_cᵀ``) and ``L`` stay in the original index order; a chosen index gets
    ``d = -∞``. One step, for the panel's columns ``L_c`` (n × nb, zero beyond the current one)::

        best, p = max(d)                       (first maximum: ties to the lowest index)
        l = (W[p, :] - L_c L_c[p, :]ᵀ) / sqrt(best),    l[chosen] = 0
        L_c[:, j] = l,   d -= l²,   d[p] = -∞,   perm[i] = p

    is a fixed sequence of 15 kernels on fixed-size buffers, with the step counters ``i`` and
    ``j`` on the device too. On CUDA the step is captured once as a CUDA graph and replayed for
    every pivot, so a pivot costs 15 kernel launches from the GPU itself rather than from
    Python. The stopping test (``best <= rtol * max(diag G)``) is recorded on
    the device and read once per panel; the steps after it only touch discarded columns.
    """
    n = W.shape[0]
    device = W.device
    nb = min(_CHOLESKY_BLOCK, max(steps, 1))
    d = W.diagonal().clone()
    tol = d.max().clamp_min(0) * rtol if n else d.new_zeros(())
    Lc = W.new_zeros((n, nb))
    L = W.new_zeros((n, steps))
    perm = torch.zeros(steps, dtype=torch.long, device=device)
    bests = W.new_zeros(steps)  # the largest diagonal of every step: the stopping test
    ij = torch.zeros(2, dtype=torch.long, device=device)  # the step counters i and j

    def step() -> None:  # 15 kernels, no host synchronisation
        best, p = d.max(0)
        pv = p.view(1)
        bests.index_copy_(0, ij[:1], best.view(1))
        col = torch.addmv(W.index_select(0, pv)[0], Lc, Lc.index_select(0, pv)[0], alpha=-1.0)
        col.mul_(best.rsqrt())  # inf/NaN only after the stop, in discarded columns
        col.masked_fill_(d == -math.inf, 0.0)
        Lc.index_copy_(1, ij[1:], col[:, None])
        d.addcmul_(col, col, value=-1.0)
        d.index_fill_(0, pv, -math.inf)
        perm.index_copy_(0, ij[:1], pv)
        ij.add_(1)

    graph = None
    i = 0
    rank = steps
    while i < steps:
        c0 = i
        stop = min(c0 + nb, steps)
        for i in range(c0, stop):
            if graph is not None:
                graph.replay()
            else:
                step()  # on CUDA, the first step also warms up the kernels for the capture
                if device.type == "cuda" and _CUDA_GRAPHS and i + 1 < steps:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()
        i = stop
        # the one synchronisation of the panel: the first step whose best diagonal was <= tol
        failed = torch.where(bests[c0:stop] > tol, stop, torch.arange(c0, stop, device=device))
        rank = int(failed.min())
        kb = min(i, rank) - c0
        if kb > 0:
            L[:, c0 : c0 + kb] = Lc[:, :kb]
        if rank < i:
            break
        rank = steps
        if i < steps:
            W.addmm_(Lc[:, :kb], Lc[:, :kb].T, alpha=-1.0)
            Lc.zero_()
            ij[1].zero_()

    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    chosen[perm[:rank]] = True
    rest = torch.argsort(chosen.to(torch.int8), stable=True)[: n - rank]  # increasing order
    full = torch.cat((perm[:rank], rest))
    return PivotedCholesky(L[:, :rank].index_select(0, full), full, rank)


_CUDA_GRAPHS = True
"""Replay the pivot step of :func:`_pivoted_cholesky_device` as a CUDA graph (on CUDA)."""


def _host_pivots(device: torch.device) -> bool:
    """Whether pivots are read on the host: on the CPU a read costs nothing and slicing with a
    Python int is cheaper than masked device-side swaps; elsewhere every read is a round trip.
    ``_FORCE_DEVICE_PIVOTS`` (tests) runs the device-side path on the CPU."""
    return device.type == "cpu" and not _FORCE_DEVICE_PIVOTS


_FORCE_DEVICE_PIVOTS = False
"""Run the synchronisation-free (GPU) code paths on the CPU too; for tests and benchmarks."""


@torch.no_grad()
def prefix_qr_pivots(U: Tensor, ps: Sequence[int], *, max_bytes: int | None = None) -> list[Tensor]:
    r"""The first p pivots of the QR with column pivoting of ``U[:, :p]ᵀ``, for every p at once.

    This is Golub–Klema–Stewart subset selection (Algorithm 2 of Zhang, Davoodi & Hu) for a whole
    grid of ranks. Problem b factors ``U_bᵀ = U[:, :p_b]ᵀ`` (p_b × n). Because ``U`` has
    orthonormal columns, the squared partial column norms of ``U_bᵀ`` are the Schur-complement
    diagonal of its Gram matrix, the projector ``P_b = U_b U_bᵀ`` (n × n), so the pivots are those
    of the greedy diagonal-pivoted Cholesky of ``P_b``. The projector is never formed: its column
    j is ``U_b U_b[j, :]ᵀ``, a product with ``U``. Step i, for every problem with ``p_b > i``::

        j_b      = argmax_k d_b[k]                     (ties to the lowest index)
        ℓ_b      = L_b[j_b, :i]
        L_b[:, i] = (U (m_b ⊙ U[j_b, :])ᵀ - L_b[:, :i] ℓ_bᵀ) / sqrt(d_b[j_b])
        d_b     -= L_b[:, i]²,   d_b[j_b] = -∞

    with ``d_b[k] = ||U_b[k, :]||²`` at the start and ``m_b`` the mask of the first p_b columns.
    One GEMM with ``U`` serves all running problems (BLAS-3) and the correction is one batched
    GEMV. Pivots stay device tensors: the loop has no host synchronisation. In exact arithmetic
    the pivots are those of LAPACK ``xGEQP3`` on ``U_bᵀ`` (exact ties aside); in float64 they
    agree on generic matrices.

    Cost: ``≈ 3 n Σ_b p_b²`` flops, two thirds of them in GEMMs; ``L_b`` takes ``p_b × n``
    entries, so the problems run in chunks of at most ``max_bytes`` (default: 256 MiB on the CPU,
    a quarter of the free memory on a GPU).

    Args:
        U: ``(n, r)`` float32/float64 matrix with orthonormal columns (the left singular vectors
            of the activations, largest first), on any device.
        ps: the ranks, each in ``[1, r]``, in any order; repeats are allowed.
        max_bytes: working-memory bound of one chunk.

    Returns:
        One ``(p,)`` int64 tensor per entry of ``ps``: the pivots in pivot order, on ``U``'s
        device.

    Raises:
        ValueError: if ``U`` is not a finite float32/float64 matrix or a rank is out of range.

    Example:
        >>> U = torch.linalg.qr(torch.randn(50, 8, dtype=torch.float64))[0]
        >>> piv = prefix_qr_pivots(U, [8, 3])
        >>> torch.equal(piv[1], pivoted_qr(U[:, :3].T, k=3, compute_q=False).perm[:3])
        True
    """
    _check_matrix(U, "U")
    n, r = U.shape
    ranks = []
    for p in ps:
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 1 <= p <= r:
            raise ValueError(f"ranks `ps` must be integers in [1, {r}] (U is {n} × {r}), got {p!r}")
        ranks.append(int(p))
    out: list[Tensor] = [U.new_empty(0, dtype=torch.long)] * len(ranks)
    if not ranks:
        return out
    device = U.device
    if max_bytes is None:
        if device.type == "cuda":
            max_bytes = int(torch.cuda.mem_get_info(device)[0] * _DEVICE_BATCH_FRACTION)
        else:
            max_bytes = _CPU_BATCH_BYTES
    order = sorted(range(len(ranks)), key=lambda b: -ranks[b])
    # d_b at the start: the squared row norms of U[:, :p_b], accumulated over column blocks
    # (no n × r temporary)
    d0: dict[int, Tensor] = {}
    running, done = U.new_zeros(n), 0
    for p in sorted(set(ranks)):
        running = running + U[:, done:p].square().sum(1)
        d0[p], done = running, p
    start = 0
    while start < len(order):
        p0 = ranks[order[start]]
        count = max(1, max_bytes // (p0 * n * U.element_size()))
        chunk = order[start : start + count]
        start += len(chunk)
        pivots = _prefix_pivots_chunk(U, d0, [ranks[b] for b in chunk])
        for b, piv in zip(chunk, pivots, strict=True):
            out[b] = piv
    return out


def _prefix_pivots_chunk(U: Tensor, d0: dict[int, Tensor], ranks: list[int]) -> list[Tensor]:
    """:func:`prefix_qr_pivots` for ``ranks`` sorted in decreasing order (one chunk)."""
    n = U.shape[0]
    B, p0 = len(ranks), ranks[0]
    device = U.device
    p_t = torch.tensor(ranks, device=device)
    d = torch.stack([d0[p] for p in ranks])  # (B, n)
    mask = (torch.arange(p0, device=device) < p_t[:, None]).to(U.dtype)  # (B, p0)
    U_0 = U[:, :p0]
    Lt = U.new_empty((B, p0, n))  # Lt[b, i] = L_b[:, i]; rows are written before they are read
    piv = torch.zeros((B, p0), dtype=torch.long, device=device)
    tiny = torch.finfo(U.dtype).tiny
    active = B
    for i in range(p0):
        while ranks[active - 1] <= i:  # problems are sorted: the running ones are a prefix
            active -= 1
        d_a = d[:active]
        j = d_a.argmax(1)  # (Ba,)
        d_j = d_a.gather(1, j[:, None])  # (Ba, 1)
        u = U_0.index_select(0, j).mul_(mask[:active])  # (Ba, p0): U_b[j_b, :]
        col = u @ U_0.T  # (Ba, n): P_b[:, j_b]
        if i:
            ell = Lt[:active, :i].gather(2, j.view(active, 1, 1).expand(active, i, 1))
            col.unsqueeze(1).baddbmm_(ell.transpose(1, 2), Lt[:active, :i], alpha=-1.0)
        col.mul_(d_j.clamp_min(tiny).rsqrt())
        Lt[:active, i] = col
        d_a.addcmul_(col, col, value=-1.0)
        d_a.scatter_(1, j[:, None], -math.inf)
        piv[:active, i] = j
    return [piv[b, : ranks[b]] for b in range(B)]


def _update_upper(W: Tensor, Lt: Tensor, i: int, tile: int = 512) -> None:
    """Schur update of the upper triangle of ``W[i:, i:]``: ``W[i:, i:] -= Lt[:, i:]ᵀ Lt[:, i:]``.

    ``Lt`` is ``(kb, n)``, the panel's columns of ``L`` transposed. Row tiles ``[a, b)`` update
    ``W[a:b, a:]`` only (a block staircase holding the upper triangle), about half the flops of the
    full GEMM. Entries below the diagonal are not maintained.
    """
    n = W.shape[0]
    for a in range(i, n, tile):
        b = min(a + tile, n)
        W[a:b, a:].addmm_(Lt[:, a:b].T, Lt[:, a:], alpha=-1.0)


def _swap(a: Tensor, b: Tensor) -> None:
    """Exchange the contents of two equally shaped, non-overlapping views."""
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


def _symmetrized(G: Tensor, amax: float) -> Tensor:
    """Return a new ``(G + Gᵀ) / 2``, after checking that ``max|G - Gᵀ| <= sqrt(eps) max|G|``.

    Raises:
        ValueError: if ``G`` is not symmetric to that tolerance.
    """
    W = torch.empty_like(G, memory_format=torch.contiguous_format)
    W.copy_(G.T)  # blocked transpose
    W.sub_(G)  # Gᵀ - G, in place: no second n × n temporary
    if W.numel():
        lo, hi = torch.aminmax(W)
        asym = max(-lo.item(), hi.item())
        if asym > math.sqrt(torch.finfo(G.dtype).eps) * amax:
            raise ValueError(
                f"`G` must be symmetric, got shape {tuple(G.shape)} with max |G - Gᵀ| = "
                f"{asym:.3g} (max |G| = {amax:.3g})"
            )
    return torch.add(G, W, alpha=0.5, out=W)
