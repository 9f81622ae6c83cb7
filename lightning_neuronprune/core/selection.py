"""Choosing the p neurons to keep (Algorithm 2 of Zhang, Davoodi & Hu 2018 and a nested variant).

Two methods, both computed from the Gram matrix ``G = X Xᵀ`` alone:

* ``"svd_qr"`` (the paper): ``G = U Σ² Uᵀ``; QR with column pivoting of ``U_pᵀ`` (p × n); the
  first p pivots are kept (Golub–Klema–Stewart subset selection). It needs one pivoted QR per p.
* ``"qr"`` (nested): greedy pivoted Cholesky of ``G``, which picks the same pivots as QR with
  column pivoting of ``Xᵀ``. The order is nested in p, so one factorisation serves a whole sweep.
* ``"output"`` (output-aware, nested): greedy forward selection that maximises the energy of the
  consumer's output ``W X`` explained by the kept features after the Eq. 6 re-fit. It needs the
  consumer's weight ``W`` besides ``G``; see :func:`output_order`.

When ``affine=True`` the centered covariance replaces ``G``, matching the affine least-squares fit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_neuronprune.core.cholesky import check_matrix
from lightning_neuronprune.core.linalg import pivoted_cholesky, pivoted_qr
from lightning_neuronprune.core.statistics import JunctionStatistics

__all__ = [
    "METHODS",
    "Method",
    "check_p",
    "explained_output_energy",
    "greedy_output",
    "nested_order",
    "numerical_rank",
    "output_factor",
    "output_order",
    "prefix_qr_pivots",
    "select_neurons",
    "spectrum",
]

Method = Literal["svd_qr", "qr", "output"]
METHODS: tuple[str, ...] = ("svd_qr", "qr", "output")
#: The methods whose selection depends on the consumer's weight ``W``.
WEIGHT_METHODS: tuple[str, ...] = ("output",)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")


def check_p(p: int, n: int) -> None:
    """Refuse a ``p`` that is not an integer in ``[1, n]`` (a ``ValueError`` naming both)."""
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
    weight: Tensor | None = None,
) -> Tensor:
    """Pick the p features to keep.

    Args:
        stats: statistics of the n features.
        p: how many to keep, ``1 ≤ p ≤ n``.
        method: ``"svd_qr"`` (Algorithm 2), ``"qr"`` (nested pivoted Cholesky) or ``"output"``
            (output-aware greedy, :func:`output_order`; needs ``weight`` or ``order``).
        centered: select on the covariance instead of ``G`` (use with the affine fit).
        order: a precomputed :func:`nested_order` for ``method="qr"`` or :func:`output_order`
            for ``method="output"`` (saves the factorisation).
        basis: precomputed eigenvectors ``U`` from :func:`spectrum` for ``method="svd_qr"``.
        weight: the consumer's weight ``W`` (m × n), for ``method="output"``.

    Returns:
        (p,) sorted LongTensor of kept feature indices, on the statistics' device.
    """
    _check_method(method)
    n = stats.num_features
    check_p(p, n)
    if method == "qr":
        if order is None:
            order = nested_order(stats, centered=centered)
        kept = order[:p]
    elif method == "output":
        if order is None:
            if weight is None:
                raise ValueError(
                    "`method='output'` needs the consumer's `weight` (or a precomputed `order`)"
                )
            order = output_order(stats, weight, centered=centered, steps=p)
        kept = order[:p]
    else:
        U = basis if basis is not None else spectrum(stats, centered=centered)[1]
        U_p = U[:, :p]
        kept = pivoted_qr(U_p.T.contiguous(), k=p, compute_q=False).perm[:p]
    return torch.sort(kept).values


def output_factor(weight: Tensor, n: int, like: Tensor) -> Tensor:
    """A factor ``F`` with ``Fᵀ F = Wᵀ W`` and at most n rows (``W`` itself when m ≤ n)."""
    if weight.dim() != 2 or weight.shape[1] != n:
        raise ValueError(
            f"`weight` must be the consumer's (m × {n}) weight matrix, got shape "
            f"{tuple(weight.shape)}"
        )
    W = weight.detach().to(device=like.device, dtype=like.dtype)
    if W.shape[0] > n:
        W = torch.linalg.qr(W, mode="r").R  # (n × n): RᵀR = WᵀW, fewer rows to update
    return W


def output_order(
    stats: JunctionStatistics,
    weight: Tensor,
    *,
    centered: bool = False,
    steps: int | None = None,
    rtol: float | None = None,
    moment: Tensor | None = None,
) -> Tensor:
    """The nested order of the ``"output"`` method: keeping ``order[:p]`` is the choice for p.

    Greedy forward selection of the features that best explain the consumer's output ``Y = W X``
    after the least-squares re-fit of Eq. 6. With the kept set S, the re-fitted output is the
    projection of ``Y`` on the row space of ``X_S`` and the unexplained part of the features is the
    Schur complement ``R = G - G[:, S] G[S, S]⁻¹ G[S, :]`` (n × n). Adding feature j explains

        gain_j = ‖W R[:, j]‖² / R[j, j]

    more of ``‖Y‖²_F``, so the step picks ``argmax_j gain_j`` and updates, with ``r = R[:, k]``,

        R ← R - r rᵀ / R[k, k],     V = W R ← V - V[:, k] rᵀ / R[k, k]       (V: m × n).

    Each step costs O(n² + m n) and needs no host synchronisation: the pivot stays a device
    tensor, features whose residual falls under ``rtol · max diag(G)`` (linear combinations of the
    kept ones) score below every other, and their update is skipped on the device. When m > n,
    ``W`` is replaced by the triangular factor of its QR (same ``WᵀW``). Features that explain
    nothing more come last, in index order.

    Args:
        stats: statistics of the n features (``G``, or the covariance with ``centered``).
        weight: the consumer's weight ``W`` (m × n).
        centered: use the covariance (the affine fit's normal matrix) instead of ``G``.
        steps: stop the greedy after this many picks (the rest follows in index order);
            defaults to n.
        rtol: residual cut-off relative to the largest diagonal of ``G``; defaults to
            ``n · eps(float32)``, the tolerance of :func:`numerical_rank`.
        moment: ``stats.second_moment(centered=centered)``, if already computed.

    Returns:
        (n,) LongTensor permutation of ``range(n)``, on the statistics' device.
    """
    M = stats.second_moment(centered=centered) if moment is None else moment
    n = M.shape[0]
    steps = n if steps is None else max(0, min(int(steps), n))
    rtol = n * torch.finfo(torch.float32).eps if rtol is None else rtol
    F = output_factor(weight, n, M)
    return greedy_output(M, F @ M, steps, rtol)


def greedy_output(G: Tensor, V: Tensor, steps: int, rtol: float) -> Tensor:
    """The greedy recursion of :func:`output_order` from ``R = G`` and a given ``V`` (m × n).

    ``V = F G`` gives the output-aware selection; ``V = F C`` with a cross moment ``C`` gives the
    compensating one (:mod:`~lightning_neuronprune.search.compensation`). Neither input is modified.
    """
    n = G.shape[0]
    R = G.clone()
    V = V.clone()
    tol = rtol * G.diagonal().max().clamp_min(torch.finfo(G.dtype).tiny)
    taken = torch.zeros(n, dtype=torch.bool, device=G.device)
    order = torch.empty(steps, dtype=torch.long, device=G.device)
    # Untaken features that explain nothing more score -1 (first by index: argmax takes the first
    # maximum), taken ones -inf.
    floor = torch.full((n,), -1.0, dtype=G.dtype, device=G.device)
    gone = torch.full((n,), -float("inf"), dtype=G.dtype, device=G.device)
    for step in range(steps):
        d = R.diagonal()
        live = d > tol
        gain = torch.where(live, (V * V).sum(0) / torch.where(live, d, torch.ones_like(d)), floor)
        # The pivot stays a (1,) device tensor: index_* ops, never a Python int (no sync).
        k = torch.argmax(torch.where(taken, gone, gain)).reshape(1)
        order[step : step + 1] = k
        taken.index_fill_(0, k, True)
        dk = d.index_select(0, k)
        scale = torch.where(dk > tol, 1.0 / dk.clamp_min(tol), torch.zeros_like(dk))
        r = R.index_select(1, k).squeeze(1)
        # in-place rank-one updates: no n × n temporary per step
        R.addr_(r * scale, r, alpha=-1)
        V.addr_(V.index_select(1, k).squeeze(1) * scale, r, alpha=-1)
    # The untaken features in index order (a stable sort, not nonzero: no sync).
    rest = torch.argsort(taken.to(torch.int8), stable=True)[: n - steps]
    return torch.cat([order, rest])


def explained_output_energy(
    stats: JunctionStatistics, weight: Tensor, kept: Tensor, *, centered: bool = False
) -> Tensor:
    """``tr(W G[:, S] G[S, S]⁺ G[S, :] Wᵀ)``: the part of ``‖W X‖²_F`` (per sample) that the
    kept features S explain after the least-squares re-fit; what :func:`output_order` maximises
    greedily. Returns a float64 scalar tensor."""
    M = stats.second_moment(centered=centered)
    W = weight.detach().to(device=M.device, dtype=M.dtype)
    kept = kept.to(device=M.device, dtype=torch.long)
    B = W @ M[:, kept]  # (m × p)
    A = M[kept][:, kept]
    return (B @ torch.linalg.pinv(A, hermitian=True) * B).sum()


_CPU_BATCH_BYTES = 256 * 2**20
"""Working memory of one chunk of :func:`prefix_qr_pivots` on the CPU."""

_DEVICE_BATCH_BYTES = 2**30
"""Working memory of one chunk of :func:`prefix_qr_pivots` on an accelerator: a fixed budget, so
that every DDP rank cuts the same problem into the same chunks whatever memory it has free."""


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
    1 GiB on an accelerator). The chunks depend on the problem (``n``, ``ps``, the dtype) and
    ``max_bytes`` only, never on the memory free at the time, and the pivots do not depend on
    the chunks (checked bit for bit on near ties): every chunk's GEMM with ``U`` has the inner
    dimension ``max(ps)`` (the columns past ``p_b`` masked to zero) and is taken as
    ``U[:, :max(ps)] uᵀ``, whose n rows do not change with the number of running problems (MKL
    summed a row of ``u U[:, :p0]ᵀ`` differently as that number changed). That orientation costs
    about twice the time of the other in the GEMM on a CPU.

    Args:
        U: ``(n, r)`` float32/float64 matrix with orthonormal columns (the left singular vectors
            of the activations, largest first), on any device.
        ps: the ranks, each in ``[1, r]``, in any order; repeats are allowed.
        max_bytes: working-memory bound of one chunk (a cap the caller may set; at least one
            problem always runs per chunk).

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
    check_matrix(U, "U")
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
        max_bytes = _CPU_BATCH_BYTES if device.type == "cpu" else _DEVICE_BATCH_BYTES
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
        pivots = _prefix_pivots_chunk(U, d0, [ranks[b] for b in chunk], width=ranks[order[0]])
        for b, piv in zip(chunk, pivots, strict=True):
            out[b] = piv
    return out


def _prefix_pivots_chunk(
    U: Tensor, d0: dict[int, Tensor], ranks: list[int], *, width: int
) -> list[Tensor]:
    """:func:`prefix_qr_pivots` for ``ranks`` sorted in decreasing order (one chunk).

    ``width`` (≥ ``ranks[0]``) is the inner dimension of the GEMM with ``U``: the same for every
    chunk, so that BLAS sums each problem's products in the same blocks whatever the chunk.
    """
    n = U.shape[0]
    B, p0 = len(ranks), ranks[0]
    device = U.device
    p_t = torch.tensor(ranks, device=device)
    d = torch.stack([d0[p] for p in ranks])  # (B, n)
    mask = (torch.arange(width, device=device) < p_t[:, None]).to(U.dtype)  # (B, width)
    U_0 = U[:, :width]
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
        u = U_0.index_select(0, j).mul_(mask[:active])  # (Ba, width): U_b[j_b, :], zero-padded
        # (Ba, n): P_b[:, j_b]. As (n × width) @ (width × Ba): each column's sums do not change
        # with Ba, which shrinks over the loop and differs between chunks.
        col = (U_0 @ u.T).T.contiguous()
        if i:
            ell = Lt[:active, :i].gather(2, j.view(active, 1, 1).expand(active, i, 1))
            col.unsqueeze(1).baddbmm_(ell.transpose(1, 2), Lt[:active, :i], alpha=-1.0)
        col.mul_(d_j.clamp_min(tiny).rsqrt())
        Lt[:active, i] = col
        d_a.addcmul_(col, col, value=-1.0)
        d_a.scatter_(1, j[:, None], -math.inf)
        piv[:active, i] = j
    return [piv[b, : ranks[b]] for b in range(B)]
