from __future__ import annotations

import pytest
import torch

from lightning_neuronprune.core.reconstruction import (
    least_squares_transform,
    reconstruct_consumer,
    solve_psd,
)
from lightning_neuronprune.core.statistics import JunctionStatistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_matches_lstsq(generator: torch.Generator, dtype: torch.dtype) -> None:
    X = torch.randn(500, 12, generator=generator, dtype=dtype)  # K × n
    stats = JunctionStatistics.from_activations(X)
    kept = torch.tensor([0, 3, 4, 7, 9])
    T, c = least_squares_transform(stats, kept)
    # Independent reference: min_T ||X_p T^T - X||  (rows are samples).
    ref = torch.linalg.lstsq(X[:, kept].double(), X.double()).solution.T
    torch.testing.assert_close(T, ref, rtol=1e-6, atol=1e-6 if dtype == torch.float64 else 1e-5)
    torch.testing.assert_close(T[kept], torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    assert c is None  # no intercept without the affine fit


def test_affine_fit_matches_lstsq_with_intercept(generator: torch.Generator) -> None:
    X = torch.relu(torch.randn(400, 8, generator=generator, dtype=torch.float64)) + 1.0
    stats = JunctionStatistics.from_activations(X)
    kept = torch.tensor([1, 2, 5])
    T, c = least_squares_transform(stats, kept, affine=True)
    A = torch.cat([X[:, kept], torch.ones(400, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(A, X).solution  # (p+1) × n
    torch.testing.assert_close(T, sol[:3].T)
    torch.testing.assert_close(c, sol[3])


def test_consumer_update_and_bias_folding(generator: torch.Generator) -> None:
    X = torch.randn(300, 6, generator=generator, dtype=torch.float64) + 2
    stats = JunctionStatistics.from_activations(X)
    kept = torch.tensor([0, 1, 2, 3])
    W = torch.randn(4, 6, generator=generator)
    rec = least_squares_transform(stats, kept, affine=True)
    W_p, b_p = reconstruct_consumer(W, None, rec)
    assert W_p.dtype == torch.float32 and W_p.shape == (4, 4)
    assert b_p is not None and b_p.shape == (4,)
    approx = X[:, kept] @ W_p.double().T + b_p.double()
    full = X @ W.double().T
    # The affine fit is the best approximation with an intercept: beats the plain fit.
    W_0, _ = reconstruct_consumer(W, None, least_squares_transform(stats, kept))
    assert (approx - full).norm() <= (X[:, kept] @ W_0.double().T - full).norm() + 1e-9


def test_dead_and_duplicate_neurons_stay_finite(generator: torch.Generator) -> None:
    X = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    X = torch.cat([X, torch.zeros(200, 1), X[:, :1]], 1)  # feature 5 dead, 6 duplicates 0
    stats = JunctionStatistics.from_activations(X)
    kept = torch.tensor([0, 5, 6])
    for ridge in (0.0, 1e-3):
        T, _ = least_squares_transform(stats, kept, ridge=ridge)
        assert torch.isfinite(T).all()
    T, _ = least_squares_transform(stats, kept)
    # The reconstruction is still the best fit: kept columns reproduce themselves.
    torch.testing.assert_close(X[:, kept] @ T[kept].T, X[:, kept], atol=1e-8, rtol=0)
    assert torch.isfinite(solve_psd(torch.zeros(2, 2), torch.ones(3, 2))).all()


def test_ridge_shrinks_and_rejects_negative(generator: torch.Generator) -> None:
    X = torch.randn(100, 4, generator=generator, dtype=torch.float64)
    stats = JunctionStatistics.from_activations(X)
    kept = torch.tensor([0, 1])
    T0, _ = least_squares_transform(stats, kept)
    T1, _ = least_squares_transform(stats, kept, ridge=10.0)
    assert T1.norm() < T0.norm()
    with pytest.raises(ValueError, match="`ridge` must be non-negative, got -1"):
        least_squares_transform(stats, kept, ridge=-1)


def test_cholesky_solve_flags_singular_normal_matrices_without_synchronising() -> None:
    from lightning_neuronprune.core.reconstruction import solve_psd_cholesky, solve_psd_pinv

    X = torch.randn(4, 50, dtype=torch.float64)
    A = X @ X.T
    B = torch.randn(6, 4, dtype=torch.float64)
    Y, ok = solve_psd_cholesky(A, B)
    assert ok.dtype == torch.bool and ok.shape == () and bool(ok)
    torch.testing.assert_close(Y @ A, B)
    X_dup = torch.cat([X, X[:1]])  # a duplicate row: the 5 x 5 normal matrix is singular
    A_dup = X_dup @ X_dup.T
    B_dup = torch.randn(6, 5, dtype=torch.float64)
    _, ok = solve_psd_cholesky(A_dup, B_dup)
    assert not bool(ok)
    Y = solve_psd(A_dup, B_dup)  # falls back to the pseudo-inverse
    torch.testing.assert_close(Y, solve_psd_pinv(A_dup, B_dup))
    torch.testing.assert_close(Y, B_dup @ torch.linalg.pinv(A_dup), atol=1e-8, rtol=1e-8)
