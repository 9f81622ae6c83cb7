"""Tests of :mod:`lightning_neuronprune.core.linalg` against LAPACK (``scipy.linalg.qr``,
``geqp3``).

Tolerances. Householder QR is normwise backward stable: ``||A P - Q R|| <= c(m, n) ε ||A||`` with
``c`` of order ``m n`` in the worst case (Higham, *Accuracy and Stability*, Thm 19.4) and of order
``sqrt(n)`` in practice (rounding errors behave like a random walk). We use ``50 ε sqrt(n)``: a
safety factor of about 10 above what both LAPACK and our code reach on these matrices, and still
orders of magnitude below what a wrong reflector or a wrong pivot swap would give (O(1)).

Pivots. On generic matrices the pivot sequence must be LAPACK's, up to a near-tie
(:func:`lapack_reference.assert_same_pivots`). The pivoted Cholesky has its own tests in
``test_cholesky.py``, the batched subset selection ``prefix_qr_pivots`` in ``test_selection.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from lapack_reference import (
    DTYPES,
    NP_DTYPES,
    assert_same_pivots,
    low_rank,
    machine_eps,
    partial_norms,
)

from lightning_neuronprune.core.linalg import PivotedQR, pivoted_cholesky, pivoted_qr

# Every test runs twice: pivots read on the host (the CPU path) and kept on the device (the
# synchronisation-free GPU path: device-side swaps, Gram-based QR pivots), forced on the CPU.
pytestmark = pytest.mark.usefixtures("pivots_on")
SHAPES = [(50, 30), (30, 50), (64, 64), (128, 256)]


def _check_qr(A: torch.Tensor, res: PivotedQR, k: int) -> None:
    """Structural checks: shapes, dtypes, orthonormal Q, upper trapezoidal R, decreasing |diag|."""
    m, n = A.shape
    Q, R, perm = res
    eps = machine_eps(A.dtype)
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
    eps = machine_eps(dtype)
    assert _relative_residual(A, Q, R, perm) <= 50 * eps * math.sqrt(n)
    assert_same_pivots(
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


def _rank_deficient_cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, int]]:
    dup = rng.standard_normal((40, 20))
    dup = np.concatenate([dup, dup[:, [3, 7, 11]], dup[:, :2]], axis=1)  # 25 columns, rank 20
    zero = rng.standard_normal((30, 24))
    zero[:, [0, 5, 6, 23]] = 0.0  # rank 20
    return {
        "duplicate": (dup, 20),
        "zero": (zero, 20),
        "low_rank_tall": (low_rank(rng, 60, 40, 12), 12),
        "low_rank_wide": (low_rank(rng, 30, 70, 9), 9),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["duplicate", "zero", "low_rank_tall", "low_rank_wide"])
def test_pivoted_qr_rank_deficient(rng: np.random.Generator, case: str, dtype) -> None:
    A_np, rank = _rank_deficient_cases(rng)[case]
    A_np = A_np.astype(NP_DTYPES[dtype])
    A = torch.from_numpy(A_np)
    m, n = A.shape
    eps = machine_eps(dtype)
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
    residual = partial_norms(A_np, lead, np.arange(n))
    assert residual.max() <= 100 * eps * math.sqrt(n) * scale
    # the first pivots are those of LAPACK too, up to the numerical rank
    perm_ref = scipy.linalg.qr(A_np, mode="economic", pivoting=True)[2]
    assert_same_pivots(A_np, perm.numpy(), perm_ref, rank, near_tie=1e-3)
    if case == "zero":
        assert not set(lead.tolist()) & {0, 5, 6, 23}
    if case == "duplicate":
        for a, b in [(3, 20), (7, 21), (11, 22), (0, 23), (1, 24)]:
            assert not {a, b} <= set(lead.tolist())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(70, 40), (40, 90)])
def test_pivoted_qr_truncated(rng: np.random.Generator, shape, dtype) -> None:
    A = torch.from_numpy(rng.standard_normal(shape).astype(NP_DTYPES[dtype]))
    eps = machine_eps(dtype)
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
    assert_same_pivots(A_np, perm.cpu().numpy(), perm_ref, 96, near_tie=1e-3)
    assert _relative_residual(A.cpu(), Q.cpu(), R.cpu(), perm.cpu()) <= 50 * machine_eps(dtype) * 13
    L, p, rank = pivoted_cholesky(A @ A.T)
    assert L.is_cuda and p.is_cuda and rank == 96
    assert torch.equal(p.cpu(), pivoted_cholesky((A @ A.T).cpu()).perm)


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
