"""Tests of :mod:`lightning_neuronprune.core.fitting`: the one fit step (select → least squares)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_neuronprune.core.fitting import FitOptions, JunctionFitter, fit_junction
from lightning_neuronprune.core.reconstruction import least_squares_transform, reconstruct_consumer
from lightning_neuronprune.core.selection import select_neurons, spectrum
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.search.sweep import rank_grid


@pytest.fixture
def stats(generator: torch.Generator) -> JunctionStatistics:
    """ReLU features of a random layer, 48 wide, with decaying scales."""
    Z = torch.randn(2000, 48, generator=generator, dtype=torch.float64)
    Z = Z * torch.logspace(0, -2, 48, dtype=torch.float64)
    return JunctionStatistics.from_activations(torch.relu(Z + 0.1))


@pytest.fixture
def consumer(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(7, 48, generator=generator), torch.randn(7, generator=generator)


@pytest.mark.parametrize("method", ["svd_qr", "qr"])
@pytest.mark.parametrize("affine", [False, True])
def test_grid_fits_equal_one_by_one_fits(stats, consumer, method: str, affine: bool) -> None:
    W, b = consumer
    options = FitOptions(method=method, affine=affine)
    fitter = JunctionFitter(stats, W, b, options)
    grid = rank_grid(48, "all", start=fitter.rank)
    fitter.prepare(grid)  # the whole grid at once
    for p in grid:
        fit = fitter.fit(p)
        kept = select_neurons(stats, p, method=method, centered=affine)  # one p at a time
        assert torch.equal(fit.kept, kept), f"kept set differs at p={p}"
        rec = least_squares_transform(stats, kept, affine=affine)
        W_p, b_p = reconstruct_consumer(W, b, rec)
        torch.testing.assert_close(fit.weight, W_p)
        torch.testing.assert_close(fit.bias, b_p)
        alone = fit_junction(stats, W, b, p, options)
        assert torch.equal(alone.kept, fit.kept)
        torch.testing.assert_close(alone.weight, fit.weight)


def test_svd_qr_kept_sets_are_lapack_subset_selection(stats, consumer) -> None:
    """Algorithm 2 with scipy: eigenvectors of G, geqp3 of U_pᵀ, at every grid point."""
    fitter = JunctionFitter(stats, *consumer)
    _, U = spectrum(stats)
    for p in rank_grid(48, "all", start=fitter.rank):
        ref = scipy.linalg.qr(np.ascontiguousarray(U[:, :p].T.numpy()), pivoting=True)[2][:p]
        assert fitter.kept(p).tolist() == sorted(ref.tolist()), f"p={p}"


def test_unchecked_fit_flags_a_singular_normal_matrix(consumer, generator) -> None:
    # features 0 and 1 are identical: keeping both makes G[S, S] singular
    Z = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    Z[:, 1] = Z[:, 0]
    stats = JunctionStatistics.from_activations(Z)
    W, b = consumer[0][:, :6], consumer[1]
    fitter = JunctionFitter(stats, W, b, FitOptions(method="qr"))
    fitter._kept[3] = torch.tensor([0, 1, 2])  # force the singular choice
    unchecked = fitter.fit(3, check=False)
    assert unchecked.ok.shape == () and not bool(unchecked.ok)
    checked = fitter.fit(3)
    assert bool(checked.ok) and torch.isfinite(checked.weight).all()
    # the pseudo-inverse fit gives the least-squares predictions: W X̂ with X̂ the projection of
    # X's rows onto the row space of X_S (unique even though T is not)
    X = Z.T
    X_S = X[[0, 1, 2]]
    X_hat = (X @ X_S.T) @ torch.linalg.pinv(X_S @ X_S.T) @ X_S
    torch.testing.assert_close(checked.weight.double() @ X_S, W.double() @ X_hat)


def test_fit_options_validation() -> None:
    with pytest.raises(ValueError, match=r"`method` must be one of .* got 'svd'"):
        FitOptions(method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`affine` must be a bool, got 1"):
        FitOptions(affine=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`ridge` must be a finite number >= 0, got -0.1"):
        FitOptions(ridge=-0.1)
    with pytest.raises(ValueError, match="got nan"):
        FitOptions(ridge=float("nan"))


def test_fitter_rejects_bad_p(stats, consumer) -> None:
    fitter = JunctionFitter(stats, *consumer)
    with pytest.raises(ValueError, match=r"`p` must be an integer in \[1, 48\].*got 49"):
        fitter.fit(49)
    with pytest.raises(ValueError, match="got 0"):
        fitter.prepare([5, 0])


def test_cpu_per_p_selection_equals_the_batched_one(stats, consumer, monkeypatch) -> None:
    import lightning_neuronprune.core.fitting as fitting

    grid = rank_grid(48, 5, start=40)
    batched = JunctionFitter(stats, *consumer)
    batched.prepare(grid)
    monkeypatch.setattr(fitting, "CPU_BATCHED_MAX_FEATURES", 10)  # 48 > 10: one QR per p
    per_p = JunctionFitter(stats, *consumer)
    per_p.prepare(grid)
    for p in grid:
        assert torch.equal(per_p.kept(p), batched.kept(p)), f"p={p}"
