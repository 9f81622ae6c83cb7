"""Tests of :mod:`lightning_neuronprune.linalg` against LAPACK (``scipy.linalg.qr``, ``geqp3``).

Tolerances. Householder QR is normwise backward stable: ``||A P - Q R|| <= c(m, n) ε ||A||`` with
``c`` of order ``m n`` in the worst case (Higham, *Accuracy and Stability*, Thm 19.4) and of order
``sqrt(n)`` in practice (rounding errors behave like a random walk). We use ``50 ε sqrt(n)``: a
safety factor of about 10 above what both LAPACK and our code reach on these matrices, and still
orders of magnitude below what a wrong reflector or a wrong pivot swap would give (O(1)).

Pivots. On generic matrices the pivot sequence must be LAPACK's. Both codes estimate partial norms
by downdating, with different rounding, so two candidates whose norms agree to a few ulps (a
near-tie) may legitimately be ordered differently; :func:`_assert_same_pivots` accepts a first
mismatch only when it is such a near-tie, measured independently in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_neuronprune.linalg import PivotedCholesky, PivotedQR, pivoted_cholesky, pivoted_qr

DTYPES = [torch.float32, torch.float64]

# Every test runs twice: pivots read on the host (the CPU path) and kept on the device (the
# synchronisation-free GPU path: device-side swaps, Gram-based QR pivots), forced on the CPU.
pytestmark = pytest.mark.usefixtures("pivots_on")
NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
SHAPES = [(50, 30), (30, 50), (64, 64), (128, 256)]


@pytest.fixture
def rng() -> np.random.Generator:
    """Seeded numpy generator (the seeded torch ``generator`` fixture is in ``conftest.py``)."""
    return np.random.default_rng(20180605)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _partial_norms(A: np.ndarray, chosen: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Norms of ``A[:, cols]`` after projecting out ``span(A[:, chosen])``, in float64."""
    A = A.astype(np.float64)
    if len(chosen) == 0:
        return np.linalg.norm(A[:, cols], axis=0)
    Qc, _ = np.linalg.qr(A[:, chosen])
    E = A[:, cols] - Qc @ (Qc.T @ A[:, cols])
    return np.linalg.norm(E, axis=0)


def _assert_same_pivots(
    A: np.ndarray, perm: np.ndarray, perm_ref: np.ndarray, count: int, near_tie: float
) -> None:
    """Check ``perm[:count] == perm_ref[:count]``, tolerating a first mismatch at a near-tie."""
    diff = np.flatnonzero(perm[:count] != perm_ref[:count])
    if diff.size == 0:
        return
    j = int(diff[0])
    cand = np.array([perm[j], perm_ref[j]])
    nrm = _partial_norms(A, perm_ref[:j], cand)
    rel = abs(nrm[0] - nrm[1]) / nrm.max()
    assert rel <= near_tie, (
        f"pivot {j} differs: ours {perm[j]} (norm {nrm[0]:.9g}) vs LAPACK {perm_ref[j]} "
        f"(norm {nrm[1]:.9g}), relative gap {rel:.3g} > {near_tie:.1g}"
    )


def _check_qr(A: torch.Tensor, res: PivotedQR, k: int) -> None:
    """Structural checks: shapes, dtypes, orthonormal Q, upper trapezoidal R, decreasing |diag|."""
    m, n = A.shape
    Q, R, perm = res
    eps = _eps(A.dtype)
    assert Q.shape == (m, k) and R.shape == (k, n) and perm.shape == (n,)
    assert Q.dtype == R.dtype == A.dtype and perm.dtype == torch.int64
    assert Q.device == R.device == perm.device == A.device
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    Q64 = Q.double()
    orth = (Q64.T @ Q64 - torch.eye(k, dtype=torch.float64)).abs().max().item()
    assert orth <= 50 * eps * math.sqrt(max(m, 1))
    assert torch.equal(R, R.triu())
    d = R.diagonal().abs().double()
    # pivots follow norm *estimates*, so |R_ii| may exceed |R_{i-1,i-1}| by their error only
    assert torch.all(d[1:] <= d[:-1] * (1 + 10 * math.sqrt(eps)) + eps * d[0])


def _relative_residual(A: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, perm) -> float:
    A64 = A.double()
    return ((A64[:, perm] - Q.double() @ R.double()).norm() / A64.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pivoted_qr_matches_lapack(rng: np.random.Generator, shape, dtype) -> None:
    m, n = shape
    A_np = rng.standard_normal(shape).astype(NP_DTYPES[dtype])
    A = torch.from_numpy(A_np)
    Q_ref, R_ref, perm_ref = scipy.linalg.qr(A_np, mode="economic", pivoting=True)

    res = pivoted_qr(A)
    r = min(m, n)
    _check_qr(A, res, r)
    Q, R, perm = res
    eps = _eps(dtype)
    assert _relative_residual(A, Q, R, perm) <= 50 * eps * math.sqrt(n)
    _assert_same_pivots(
        A_np, perm.numpy(), perm_ref, r, near_tie=1e-5 if dtype == torch.float32 else 1e-9
    )
    if np.array_equal(perm.numpy(), perm_ref):
        # same reflectors as LAPACK (same sign convention): R agrees to round-off
        scale = np.abs(R_ref).max()
        assert np.abs(R.numpy() - R_ref).max() <= 50 * eps * math.sqrt(n) * scale
        assert np.abs(Q.numpy() - Q_ref).max() <= 1e3 * eps * math.sqrt(n)


def test_pivoted_qr_tie_rule_is_lapack_swap_order(pivots_on: str) -> None:
    # norms (1, 1, 2): column 2 first and is swapped with column 0; the tie between columns 1 and
    # 0 is then resolved by position in the swapped order, which LAPACK gives to column 1. The
    # device path (no swaps) gives exact ties to the lowest index, as documented.
    A_np = np.diag([1.0, 1.0, 2.0])
    perm_ref = scipy.linalg.qr(A_np, pivoting=True)[2]
    res = pivoted_qr(torch.from_numpy(A_np))
    assert perm_ref.tolist() == [2, 1, 0]
    assert res.perm.tolist() == ([2, 1, 0] if pivots_on == "host" else [2, 0, 1])
    assert pivoted_qr(torch.eye(6)).perm.tolist() == list(range(6))


def _low_rank(rng: np.random.Generator, m: int, n: int, rank: int) -> np.ndarray:
    return rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))


def _rank_deficient_cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, int]]:
    dup = rng.standard_normal((40, 20))
    dup = np.concatenate([dup, dup[:, [3, 7, 11]], dup[:, :2]], axis=1)  # 25 columns, rank 20
    zero = rng.standard_normal((30, 24))
    zero[:, [0, 5, 6, 23]] = 0.0  # rank 20
    return {
        "duplicate": (dup, 20),
        "zero": (zero, 20),
        "low_rank_tall": (_low_rank(rng, 60, 40, 12), 12),
        "low_rank_wide": (_low_rank(rng, 30, 70, 9), 9),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["duplicate", "zero", "low_rank_tall", "low_rank_wide"])
def test_pivoted_qr_rank_deficient(rng: np.random.Generator, case: str, dtype) -> None:
    A_np, rank = _rank_deficient_cases(rng)[case]
    A_np = A_np.astype(NP_DTYPES[dtype])
    A = torch.from_numpy(A_np)
    m, n = A.shape
    eps = _eps(dtype)
    res = pivoted_qr(A)
    _check_qr(A, res, min(m, n))
    Q, R, perm = res
    assert _relative_residual(A, Q, R, perm) <= 50 * eps * math.sqrt(n)
    # |R[rank:, rank:]| ~ 0 and the first `rank` pivots span the column space
    scale = np.linalg.norm(A_np, 2)
    assert R[rank:, rank:].abs().max().item() <= 50 * eps * math.sqrt(n) * scale
    assert abs(R[rank - 1, rank - 1].item()) > 1e-3 * scale
    lead = perm[:rank].numpy()
    sv = np.linalg.svd(A_np[:, lead].astype(np.float64), compute_uv=False)
    assert sv[-1] > 1e-3 * sv[0]
    residual = _partial_norms(A_np, lead, np.arange(n))
    assert residual.max() <= 100 * eps * math.sqrt(n) * scale
    # the first pivots are those of LAPACK too, up to the numerical rank
    perm_ref = scipy.linalg.qr(A_np, mode="economic", pivoting=True)[2]
    _assert_same_pivots(A_np, perm.numpy(), perm_ref, rank, near_tie=1e-3)
    if case == "zero":
        assert not set(lead.tolist()) & {0, 5, 6, 23}
    if case == "duplicate":
        for a, b in [(3, 20), (7, 21), (11, 22), (0, 23), (1, 24)]:
            assert not {a, b} <= set(lead.tolist())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(70, 40), (40, 90)])
def test_pivoted_qr_truncated(rng: np.random.Generator, shape, dtype) -> None:
    A = torch.from_numpy(rng.standard_normal(shape).astype(NP_DTYPES[dtype]))
    eps = _eps(dtype)
    full = pivoted_qr(A)
    for k in (1, 7, 32, 33, 39):
        res = pivoted_qr(A, k=k)
        _check_qr(A, res, k)
        Q, R, perm = res
        assert torch.equal(perm[:k], full.perm[:k])
        tol = 50 * eps * math.sqrt(A.shape[1]) * A.abs().max().item()
        # same rows of R, once the columns are put back in the original order
        R_orig, R_full = torch.empty_like(R), torch.empty_like(full.R[:k])
        R_orig[:, perm], R_full[:, full.perm] = R, full.R[:k]
        assert torch.allclose(R_orig, R_full, rtol=0, atol=tol)
        # A[:, perm] = Q R + E with E ⟂ Q and every column of E no larger than |R[k-1, k-1]|
        E = A.double()[:, perm] - Q.double() @ R.double()
        assert (Q.double().T @ E).abs().max().item() <= tol
        assert E.norm(dim=0).max().item() <= abs(R[k - 1, k - 1].item()) * (1 + math.sqrt(eps))
    Q, R, perm = pivoted_qr(A, k=0)
    assert Q.shape == (A.shape[0], 0) and R.shape == (0, A.shape[1])
    assert torch.equal(perm, torch.arange(A.shape[1]))
    big = pivoted_qr(A, k=10 * max(shape))
    assert torch.equal(big.perm, full.perm) and torch.equal(big.R, full.R)


def test_pivoted_qr_does_not_modify_input_and_handles_empty(generator: torch.Generator) -> None:
    A = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    before = A.clone()
    pivoted_qr(A)
    assert torch.equal(A, before)
    Q, R, perm = pivoted_qr(torch.zeros(5, 0))
    assert Q.shape == (5, 0) and R.shape == (0, 0) and perm.numel() == 0
    Q, R, perm = pivoted_qr(torch.zeros(4, 3))
    assert torch.equal(R, torch.zeros(3, 3)) and torch.equal(perm, torch.arange(3))
    assert torch.allclose(Q.T @ Q, torch.eye(3))


def test_inputs_requiring_grad_are_accepted(generator: torch.Generator) -> None:
    X = torch.randn(6, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    Q, R, perm = pivoted_qr(X)
    L, perm_g, rank = pivoted_cholesky(X @ X.T)
    assert not (Q.requires_grad or R.requires_grad or L.requires_grad)
    assert rank == 6 and torch.allclose(X.detach()[:, perm], Q @ R)


def test_pivoted_qr_extreme_scaling(rng: np.random.Generator) -> None:
    A_np = rng.standard_normal((20, 15)).astype(np.float32)
    perm_ref = scipy.linalg.qr(A_np, pivoting=True)[2]
    for scale in (1e-30, 1e30):
        Q, R, perm = pivoted_qr(torch.from_numpy(A_np) * scale)
        assert torch.isfinite(R).all() and torch.isfinite(Q).all()
        assert perm.tolist() == perm_ref.tolist()
        assert _relative_residual(torch.from_numpy(A_np) * scale, Q, R, perm) < 1e-5


def test_pivoted_qr_non_contiguous_input(rng: np.random.Generator, pivots_on: str) -> None:
    A_np = rng.standard_normal((40, 30))
    A = torch.from_numpy(A_np).T  # (30, 40) transposed view
    perm_ref = scipy.linalg.qr(A_np.T, pivoting=True)[2]
    perm = pivoted_qr(A).perm
    # the 30 pivots; after them the host path lists the rest in LAPACK's swapped order, the
    # device path in increasing order (documented)
    assert perm[:30].tolist() == perm_ref[:30].tolist()
    rest = perm_ref[30:].tolist()
    assert perm[30:].tolist() == (rest if pivots_on == "host" else sorted(rest))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_pivoted_factorizations_on_cuda(rng: np.random.Generator, dtype) -> None:
    A_np = rng.standard_normal((96, 160)).astype(NP_DTYPES[dtype])
    A = torch.from_numpy(A_np).cuda()
    Q, R, perm = pivoted_qr(A)
    assert Q.is_cuda and R.is_cuda and perm.is_cuda
    perm_ref = scipy.linalg.qr(A_np, mode="economic", pivoting=True)[2]
    _assert_same_pivots(A_np, perm.cpu().numpy(), perm_ref, 96, near_tie=1e-3)
    assert _relative_residual(A.cpu(), Q.cpu(), R.cpu(), perm.cpu()) <= 50 * _eps(dtype) * 13
    L, p, rank = pivoted_cholesky(A @ A.T)
    assert L.is_cuda and p.is_cuda and rank == 96
    assert torch.equal(p.cpu(), pivoted_cholesky((A @ A.T).cpu()).perm)


# ----------------------------------------------------------------------------- pivoted Cholesky


@pytest.mark.parametrize("shape", [(40, 60), (100, 200), (64, 64)])
def test_pivoted_cholesky_pivots_equal_qrcp_of_xt(rng: np.random.Generator, shape) -> None:
    n, K = shape
    X = rng.standard_normal((n, K))
    G = torch.from_numpy(X @ X.T)
    L, perm, rank = pivoted_cholesky(G)
    assert rank == n and L.shape == (n, n)
    perm_ref = scipy.linalg.qr(X.T, mode="economic", pivoting=True)[2]
    _assert_same_pivots(X.T, perm.numpy(), perm_ref, n - 1, near_tie=1e-8)


def test_pivoted_cholesky_rank_deficient_stops_at_rank(rng: np.random.Generator) -> None:
    n, K = 300, 150  # stops inside the second panel
    X = rng.standard_normal((n, K))
    G = torch.from_numpy(X @ X.T)
    L, perm, rank = pivoted_cholesky(G)
    assert rank == K and L.shape == (n, K)
    perm_ref = scipy.linalg.qr(X.T, mode="economic", pivoting=True)[2]
    _assert_same_pivots(X.T, perm.numpy(), perm_ref, K, near_tie=1e-8)
    Gp = G[perm[:, None], perm]
    assert (Gp - L @ L.T).abs().max().item() <= 1e3 * n * _eps(torch.float64) * G.abs().max()
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
    assert err.item() <= 50 * _eps(dtype) * math.sqrt(n)


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


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.ones(3), r"2-D matrix, got shape \(3,\)"),
        (torch.ones(2, 3, 4), r"2-D matrix, got shape \(2, 3, 4\)"),
        (torch.ones(3, 3, dtype=torch.int64), r"dtype .*torch\.int64"),
        (torch.ones(3, 3, dtype=torch.float16), r"dtype .*torch\.float16"),
        (torch.ones(3, 3, dtype=torch.complex64), r"dtype .*torch\.complex64"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), r"finite.*shape \(2, 2\)"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), r"finite"),
    ],
)
def test_input_validation(bad: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pivoted_qr(bad)
    with pytest.raises(ValueError, match=match):
        pivoted_cholesky(bad)


def test_argument_validation() -> None:
    A = torch.eye(3)
    with pytest.raises(TypeError, match="`A` must be a torch.Tensor"):
        pivoted_qr(np.eye(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`k` must be a non-negative int or None, got -1"):
        pivoted_qr(A, k=-1)
    with pytest.raises(ValueError, match="`k` must be a non-negative int or None, got 2.0"):
        pivoted_qr(A, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`k` must be a non-negative int"):
        pivoted_cholesky(A, k=True)  # type: ignore[arg-type]
    assert pivoted_qr(A, k=np.int64(2)).R.shape == (2, 3)  # any integer type
    with pytest.raises(ValueError, match="`rtol` must be a non-negative float or None, got -0.1"):
        pivoted_cholesky(A, rtol=-0.1)
    with pytest.raises(ValueError, match=r"`G` must be square, got shape \(3, 4\)"):
        pivoted_cholesky(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"`G` must be symmetric, got shape \(2, 2\)"):
        pivoted_cholesky(torch.tensor([[2.0, 1.0], [0.0, 2.0]]))


def test_pivoted_qr_without_q_gives_the_same_pivots_and_r() -> None:
    A = torch.randn(40, 90, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = pivoted_qr(A, k=25)
    light = pivoted_qr(A, k=25, compute_q=False)
    assert light.Q.shape == (40, 0)
    assert torch.equal(light.perm, full.perm)
    torch.testing.assert_close(light.R, full.R, rtol=0, atol=0)


# ------------------------------------------------------------------ subset selection over a grid


def _orthonormal_basis(rng: np.random.Generator, n: int, decay: float = 3.0) -> torch.Tensor:
    """Eigenvectors (largest first) of the Gram matrix of features with decaying scales."""
    X = rng.standard_normal((n, 3 * n)) * np.logspace(0, -decay, n)[:, None]
    w, U = np.linalg.eigh(X @ X.T)
    return torch.from_numpy(U[:, ::-1].copy())


@pytest.mark.parametrize("n", [40, 97])
def test_prefix_qr_pivots_match_lapack_at_every_rank(rng: np.random.Generator, n: int) -> None:
    from lightning_neuronprune.selection import prefix_qr_pivots

    U = _orthonormal_basis(rng, n)
    ps = list(range(n - 1, 0, -3))
    batched = prefix_qr_pivots(U, ps)
    for p, piv in zip(ps, batched, strict=True):
        A_np = np.ascontiguousarray(U[:, :p].T.numpy())
        ref = scipy.linalg.qr(A_np, mode="r", pivoting=True)[1]
        assert piv.dtype == torch.int64 and piv.shape == (p,)
        _assert_same_pivots(A_np, piv.numpy(), ref, p, near_tie=1e-9)
        assert set(piv.tolist()) == set(ref[:p].tolist()), f"kept set differs at p={p}"


def test_prefix_qr_pivots_batched_equals_one_by_one(rng: np.random.Generator) -> None:
    from lightning_neuronprune.selection import prefix_qr_pivots

    U = _orthonormal_basis(rng, 60)
    ps = [59, 7, 30, 1, 30, 44]  # any order, repeats allowed
    together = prefix_qr_pivots(U, ps)
    for p, piv in zip(ps, together, strict=True):
        alone = prefix_qr_pivots(U, [p])[0]
        assert torch.equal(piv, alone)
        assert torch.equal(piv, pivoted_qr(U[:, :p].T, k=p, compute_q=False).perm[:p])
    # chunks forced by a tiny memory bound give the same pivots
    small = prefix_qr_pivots(U, ps, max_bytes=1)
    assert all(torch.equal(a, b) for a, b in zip(small, together, strict=True))


def test_prefix_qr_pivots_float32_and_validation(rng: np.random.Generator) -> None:
    from lightning_neuronprune.selection import prefix_qr_pivots

    U = _orthonormal_basis(rng, 30, decay=1.0)
    piv32 = prefix_qr_pivots(U.float(), [10, 20])
    piv64 = prefix_qr_pivots(U, [10, 20])
    for a, b in zip(piv32, piv64, strict=True):
        assert set(a.tolist()) == set(b.tolist())
    assert prefix_qr_pivots(U, []) == []
    with pytest.raises(ValueError, match=r"ranks `ps` must be integers in \[1, 30\].*got 31"):
        prefix_qr_pivots(U, [31])
    with pytest.raises(ValueError, match="got 0"):
        prefix_qr_pivots(U, [0])
    with pytest.raises(ValueError, match="got True"):
        prefix_qr_pivots(U, [True])
    with pytest.raises(ValueError, match="finite"):
        prefix_qr_pivots(torch.full((4, 2), float("nan")), [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_pivots_across_panels_and_rank_stop(rng: np.random.Generator) -> None:
    """The CUDA-graph path over several panels (k > 128) and with a stop at the rank."""
    X = torch.from_numpy(_low_rank(rng, 300, 400, 210))  # rank 210 < n = 300
    G = X @ X.T
    host = pivoted_cholesky(G)
    dev = pivoted_cholesky(G.cuda())
    assert dev.rank == host.rank == 210
    assert torch.equal(dev.perm.cpu(), host.perm)
    torch.testing.assert_close(dev.L.cpu(), host.L, atol=1e-8, rtol=1e-8)
    A_np = rng.standard_normal((260, 300))
    perm_ref = scipy.linalg.qr(A_np, mode="economic", pivoting=True)[2]
    Q, R, perm = pivoted_qr(torch.from_numpy(A_np).cuda(), k=200)
    _assert_same_pivots(A_np, perm.cpu().numpy(), perm_ref, 200, near_tie=1e-9)
    from lightning_neuronprune.selection import prefix_qr_pivots

    U = _orthonormal_basis(rng, 200)
    ps = [199, 150, 60, 3]
    for a, b in zip(prefix_qr_pivots(U.cuda(), ps), prefix_qr_pivots(U, ps), strict=True):
        assert torch.equal(a.cpu(), b)
