"""Tests of :mod:`lightning_neuronprune.core.cholesky`: the greedy diagonal-pivoted Cholesky of a
Gram
matrix ``G = X Xᵀ``, whose pivots are those of the QR with column pivoting of ``Xᵀ`` (LAPACK
``geqp3`` through ``scipy.linalg.qr``). Input validation shared with :func:`pivoted_qr` is tested in
``test_linalg.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from lapack_reference import DTYPES, assert_same_pivots, low_rank, machine_eps, orthonormal_basis

from lightning_neuronprune.core.cholesky import PivotedCholesky, pivoted_cholesky
from lightning_neuronprune.core.linalg import pivoted_qr

# Every test runs twice: pivots read on the host (the CPU path) and kept on the device (the
# synchronisation-free GPU path), forced on the CPU.
pytestmark = pytest.mark.usefixtures("pivots_on")


@pytest.mark.parametrize("shape", [(40, 60), (100, 200), (64, 64)])
def test_pivoted_cholesky_pivots_equal_qrcp_of_xt(rng: np.random.Generator, shape) -> None:
    n, K = shape
    X = rng.standard_normal((n, K))
    G = torch.from_numpy(X @ X.T)
    L, perm, rank = pivoted_cholesky(G)
    assert rank == n and L.shape == (n, n)
    perm_ref = scipy.linalg.qr(X.T, mode="economic", pivoting=True)[2]
    assert_same_pivots(X.T, perm.numpy(), perm_ref, n - 1, near_tie=1e-8)


def test_pivoted_cholesky_rank_deficient_stops_at_rank(rng: np.random.Generator) -> None:
    n, K = 300, 150  # stops inside the second panel
    X = rng.standard_normal((n, K))
    G = torch.from_numpy(X @ X.T)
    L, perm, rank = pivoted_cholesky(G)
    assert rank == K and L.shape == (n, K)
    perm_ref = scipy.linalg.qr(X.T, mode="economic", pivoting=True)[2]
    assert_same_pivots(X.T, perm.numpy(), perm_ref, K, near_tie=1e-8)
    Gp = G[perm[:, None], perm]
    assert (Gp - L @ L.T).abs().max().item() <= 1e3 * n * machine_eps(torch.float64) * G.abs().max()
    # a looser tolerance stops earlier, with a small Schur complement
    L2, perm2, rank2 = pivoted_cholesky(G, rtol=0.3)
    assert 0 < rank2 < K and torch.equal(perm2[:rank2], perm[:rank2])
    S = G[perm2[:, None], perm2] - L2 @ L2.T
    assert S[:rank2].abs().max().item() <= 1e-10 * G.abs().max()
    assert S.diagonal()[rank2:].max().item() <= 0.3 * G.diagonal().max().item() * (1 + 1e-12)
    assert S.diagonal()[rank2 - 1 :].max().item() <= L2[rank2 - 1, rank2 - 1].item() ** 2 * 1.001


def test_pivoted_cholesky_accepts_round_off_asymmetry(generator: torch.Generator) -> None:
    X = torch.randn(50, 80, generator=generator, dtype=torch.float32)
    G = X @ X.T
    G_asym = G + 1e-6 * G.abs().max() * torch.randn(50, 50, generator=generator).triu(1)
    before = G_asym.clone()
    L, perm, rank = pivoted_cholesky(G_asym)
    assert torch.equal(G_asym, before)  # input untouched
    assert rank == 50
    sym = (G_asym + G_asym.T) / 2
    err = (sym[perm[:, None], perm] - L @ L.T).abs().max() / G.abs().max()
    assert err.item() <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_pivoted_cholesky_reconstruction(generator: torch.Generator, dtype) -> None:
    n = 300  # more than one panel
    X = torch.randn(n, 2 * n, generator=generator, dtype=torch.float64)
    G = (X @ X.T).to(dtype)
    L, perm, rank = pivoted_cholesky(G)
    assert L.dtype == dtype and perm.dtype == torch.int64 and rank == n
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    assert torch.equal(L, L.tril()) and torch.all(L.diagonal() > 0)
    d = L.diagonal()
    assert torch.all(d[1:] <= d[:-1] * (1 + 1e-3))
    Gp = G.double()[perm[:, None], perm]
    err = (Gp - L.double() @ L.double().T).norm() / G.double().norm()
    assert err.item() <= 50 * machine_eps(dtype) * math.sqrt(n)


def test_pivoted_cholesky_truncated_and_nested(generator: torch.Generator) -> None:
    n = 200
    X = torch.randn(n, 150, generator=generator, dtype=torch.float64)
    G = X @ X.T
    full = pivoted_cholesky(G)
    for k in (1, 37, 129, 150):
        L, perm, rank = pivoted_cholesky(G, k)
        assert rank == k and L.shape == (n, k)
        assert torch.equal(perm[:k], full.perm[:k])
        # the same columns of L, once the rows are put back in the original order
        L_orig, L_full = torch.empty_like(L), torch.empty_like(full.L[:, :k])
        L_orig[perm], L_full[full.perm] = L, full.L[:, :k]
        assert torch.allclose(L_orig, L_full, atol=1e-10 * G.abs().max().item())
        Gp = G[perm[:k, None], perm]
        assert torch.allclose(Gp, (L @ L.T)[:k], atol=1e-10 * G.abs().max().item())
        rest = perm[k:]
        assert torch.equal(rest, torch.sort(rest).values)
    empty = pivoted_cholesky(G, 0)
    assert isinstance(empty, PivotedCholesky)
    assert empty.rank == 0 and empty.L.shape == (n, 0)
    assert torch.equal(empty.perm, torch.arange(n))


def test_pivoted_cholesky_ties_go_to_lowest_index() -> None:
    res = pivoted_cholesky(torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)))
    assert res.perm.tolist() == [2, 0, 1, 3] and res.rank == 4
    assert pivoted_cholesky(torch.eye(5)).perm.tolist() == list(range(5))
    zero = pivoted_cholesky(torch.zeros(4, 4))
    assert zero.rank == 0 and zero.L.shape == (4, 0) and zero.perm.tolist() == [0, 1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_pivots_across_panels_and_rank_stop(rng: np.random.Generator) -> None:
    """The CUDA-graph path over several panels (k > 128) and with a stop at the rank."""
    X = torch.from_numpy(low_rank(rng, 300, 400, 210))  # rank 210 < n = 300
    G = X @ X.T
    host = pivoted_cholesky(G)
    dev = pivoted_cholesky(G.cuda())
    assert dev.rank == host.rank == 210
    assert torch.equal(dev.perm.cpu(), host.perm)
    torch.testing.assert_close(dev.L.cpu(), host.L, atol=1e-8, rtol=1e-8)
    A_np = rng.standard_normal((260, 300))
    perm_ref = scipy.linalg.qr(A_np, mode="economic", pivoting=True)[2]
    Q, R, perm = pivoted_qr(torch.from_numpy(A_np).cuda(), k=200)
    assert_same_pivots(A_np, perm.cpu().numpy(), perm_ref, 200, near_tie=1e-9)
    from lightning_neuronprune.core.selection import prefix_qr_pivots

    U = orthonormal_basis(rng, 200)
    ps = [199, 150, 60, 3]
    for a, b in zip(prefix_qr_pivots(U.cuda(), ps), prefix_qr_pivots(U, ps), strict=True):
        assert torch.equal(a.cpu(), b)
