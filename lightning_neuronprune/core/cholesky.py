"""Greedy diagonal-pivoted Cholesky in pure torch, and the checks the pivoted factorizations share.

:func:`pivoted_cholesky` is the greedy diagonal-pivoted Cholesky of a PSD Gram matrix
``G = X Xᵀ`` (LAPACK ``xPSTRF``); in exact arithmetic its pivots are those of the QR with column
pivoting of ``Xᵀ`` (:func:`~lightning_neuronprune.core.linalg.pivoted_qr`), so it selects neurons
from second moments alone. On the CPU it is LAPACK's blocked, right-looking algorithm with
symmetric swaps; on other devices the pivots never leave the device and each pivot step is
replayed as a CUDA graph (see :func:`_pivoted_cholesky_device`).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PivotedCholesky",
    "check_matrix",
    "check_steps",
    "host_pivots",
    "pivoted_cholesky",
    "swap_views",
]

_CHOLESKY_BLOCK = 128
"""Panel width of the blocked pivoted Cholesky."""

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


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


def check_matrix(A: Tensor, name: str) -> float:
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


def check_steps(k: int | None, name: str, limit: int) -> int:
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
    amax = check_matrix(G, "G")
    n = G.shape[0]
    if G.shape[1] != n:
        raise ValueError(f"`G` must be square, got shape {tuple(G.shape)}")
    steps = check_steps(k, "k", n)
    if rtol is None:
        rtol = n * torch.finfo(G.dtype).eps
    elif isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not rtol >= 0.0:
        raise ValueError(f"`rtol` must be a non-negative float or None, got {rtol!r}")
    W = _symmetrized(G, amax)  # the trailing block W[i:, i:] is the Schur complement
    if not host_pivots(G.device):
        return _pivoted_cholesky_device(W, steps, rtol)
    device = G.device

    nb = min(_CHOLESKY_BLOCK, max(steps, 1))
    # rows in the current arrangement; columns past the rank are never written nor read, so on
    # the CPU their pages are never touched (a rank-r factor of a wide G costs n·r, not n²)
    L = G.new_empty((n, steps))
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
                swap_views(W[i, p + 1 :], W[p, p + 1 :])
                swap_views(W[i, i + 1 : p], W[i + 1 : p, p])
                swap_views(P[:, i], P[:, p])
                if c0:
                    swap_views(L[i, :c0], L[p, :c0])
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


def host_pivots(device: torch.device) -> bool:
    """Whether pivots are read on the host: on the CPU a read costs nothing and slicing with a
    Python int is cheapest; elsewhere every read is a round trip.
    ``_FORCE_DEVICE_PIVOTS`` (tests) runs the device-side path on the CPU."""
    return device.type == "cpu" and not _FORCE_DEVICE_PIVOTS


_FORCE_DEVICE_PIVOTS = False
"""Run the synchronisation-free (GPU) code paths on the CPU too; for tests and benchmarks."""


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


def swap_views(a: Tensor, b: Tensor) -> None:
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
