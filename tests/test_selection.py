from __future__ import annotations

import pytest
import scipy.linalg
import torch

from lightning_neuronprune.selection import (
    nested_order,
    numerical_rank,
    select_neurons,
    spectrum,
)
from lightning_neuronprune.statistics import JunctionStatistics


def _stats(generator: torch.Generator, n: int = 10, rank: int | None = None) -> JunctionStatistics:
    X = torch.randn(200, n, generator=generator, dtype=torch.float64)
    if rank is not None:
        X = X[:, :rank] @ torch.randn(rank, n, generator=generator, dtype=torch.float64)
    return JunctionStatistics.from_activations(X)


@pytest.mark.parametrize("p", [1, 3, 7, 10])
def test_svd_qr_is_algorithm_2_with_lapack(generator: torch.Generator, p: int) -> None:
    """SVD of X, then QR with column pivoting of U_pᵀ (LAPACK geqp3): the first p pivots."""
    stats = _stats(generator)
    _, U = spectrum(stats)
    _, _, piv = scipy.linalg.qr(U[:, :p].T.numpy(), pivoting=True, mode="economic")
    expected = torch.as_tensor(sorted(piv[:p].tolist()))
    assert torch.equal(select_neurons(stats, p, method="svd_qr"), expected)
    assert torch.equal(select_neurons(stats, p, method="svd_qr", basis=U), expected)


def test_qr_is_nested_and_matches_geqp3_of_x(generator: torch.Generator) -> None:
    X = torch.randn(200, 9, generator=generator, dtype=torch.float64)
    stats = JunctionStatistics.from_activations(X)
    order = nested_order(stats)
    _, _, piv = scipy.linalg.qr(X.numpy(), pivoting=True, mode="economic")  # QRCP of Xᵀ's columns
    assert order.tolist() == piv.tolist()
    for p in range(1, 10):
        assert torch.equal(select_neurons(stats, p, method="qr"), torch.sort(order[:p]).values)


def test_numerical_rank(generator: torch.Generator) -> None:
    assert numerical_rank(_stats(generator, rank=4)) == 4
    assert numerical_rank(_stats(generator)) == 10
    zero = JunctionStatistics.from_activations(torch.zeros(5, 3, dtype=torch.float64))
    assert numerical_rank(zero) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"p": 0}, "`p` must be an integer in \\[1, 10\\]"), ({"p": 2, "method": "lu"}, "`method`")],
)
def test_refusals(generator: torch.Generator, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_neurons(_stats(generator), **kwargs)
