from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from lapack_reference import assert_same_pivots, orthonormal_basis

from lightning_neuronprune.core.linalg import pivoted_qr
from lightning_neuronprune.core.selection import (
    nested_order,
    numerical_rank,
    prefix_qr_pivots,
    select_neurons,
    spectrum,
)
from lightning_neuronprune.core.statistics import JunctionStatistics


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


# ------------------------------------------------------------------ subset selection over a grid


@pytest.mark.usefixtures("pivots_on")
@pytest.mark.parametrize("n", [40, 97])
def test_prefix_qr_pivots_match_lapack_at_every_rank(rng: np.random.Generator, n: int) -> None:
    U = orthonormal_basis(rng, n)
    ps = list(range(n - 1, 0, -3))
    batched = prefix_qr_pivots(U, ps)
    for p, piv in zip(ps, batched, strict=True):
        A_np = np.ascontiguousarray(U[:, :p].T.numpy())
        ref = scipy.linalg.qr(A_np, mode="r", pivoting=True)[1]
        assert piv.dtype == torch.int64 and piv.shape == (p,)
        assert_same_pivots(A_np, piv.numpy(), ref, p, near_tie=1e-9)
        assert set(piv.tolist()) == set(ref[:p].tolist()), f"kept set differs at p={p}"


@pytest.mark.usefixtures("pivots_on")
def test_prefix_qr_pivots_batched_equals_one_by_one(rng: np.random.Generator) -> None:
    U = orthonormal_basis(rng, 60)
    ps = [59, 7, 30, 1, 30, 44]  # any order, repeats allowed
    together = prefix_qr_pivots(U, ps)
    for p, piv in zip(ps, together, strict=True):
        alone = prefix_qr_pivots(U, [p])[0]
        assert torch.equal(piv, alone)
        assert torch.equal(piv, pivoted_qr(U[:, :p].T, k=p, compute_q=False).perm[:p])
    # chunks forced by a tiny memory bound give the same pivots
    small = prefix_qr_pivots(U, ps, max_bytes=1)
    assert all(torch.equal(a, b) for a, b in zip(small, together, strict=True))


def _near_tie_basis(seed: int, n: int = 200, r: int = 160) -> torch.Tensor:
    """Float32 left singular vectors of activations with near-duplicate neurons: ties that
    rounding decides, where an order of summation that changes with the chunk shows."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 20, generator=g, dtype=torch.float64)
    A = A[torch.randint(0, 20, (n,), generator=g)] @ torch.randn(
        20, r, generator=g, dtype=torch.float64
    )
    A = A + 1e-9 * torch.randn(n, r, generator=g, dtype=torch.float64)
    return torch.linalg.svd(A, full_matrices=False)[0].float()


@pytest.mark.parametrize("seed", [26, 27, 28, 29])
def test_prefix_qr_pivots_do_not_depend_on_the_chunk_size(seed: int) -> None:
    """Regression: chunks were sized from the free device memory, and each chunk's GEMM with
    ``U`` took its shape from the chunk, so near ties could be decided differently (seed 28
    did). The chunks are fixed by the problem and ``max_bytes``; any chunking gives the same
    pivots, bit for bit."""
    U = _near_tie_basis(seed)
    n = U.shape[0]
    ps = [160, 150, 80, 80, 50, 21, 5, 1]
    together = prefix_qr_pivots(U, ps)
    for max_bytes in (1, 100 * 4 * n, 200 * 4 * n, 400 * 4 * n):
        chunked = prefix_qr_pivots(U, ps, max_bytes=max_bytes)
        assert all(torch.equal(a, b) for a, b in zip(chunked, together, strict=True)), max_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefix_qr_pivots_never_ask_for_the_free_device_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("prefix_qr_pivots asked for the free device memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", refuse)
    U = _near_tie_basis(28).cuda()
    ps = [160, 150, 80, 80, 50, 21, 5, 1]
    together = prefix_qr_pivots(U, ps)
    chunked = prefix_qr_pivots(U, ps, max_bytes=1)
    assert all(torch.equal(a, b) for a, b in zip(chunked, together, strict=True))


@pytest.mark.usefixtures("pivots_on")
def test_prefix_qr_pivots_float32_and_validation(rng: np.random.Generator) -> None:
    U = orthonormal_basis(rng, 30, decay=1.0)
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
