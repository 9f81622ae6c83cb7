"""The output-aware selection (``method="output"``) against independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightning_neuronprune.core.selection import (
    METHODS,
    explained_output_energy,
    output_order,
    select_neurons,
)
from lightning_neuronprune.core.statistics import JunctionStatistics


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _explained_np(G: np.ndarray, W: np.ndarray, S: list[int]) -> float:
    """tr(W G[:, S] G[S, S]⁺ G[S, :] Wᵀ), straight from the definition."""
    B = W @ G[:, S]
    return float(np.trace(B @ np.linalg.pinv(G[np.ix_(S, S)]) @ B.T))


def _greedy_np(G: np.ndarray, W: np.ndarray, steps: int) -> list[int]:
    """Forward selection by re-solving the least-squares problem for every candidate."""
    S: list[int] = []
    for _ in range(steps):
        rest = [j for j in range(G.shape[0]) if j not in S]
        scores = [_explained_np(G, W, [*S, j]) for j in rest]
        S.append(rest[int(np.argmax(scores))])
    return S


def _stats(X: np.ndarray) -> JunctionStatistics:
    """Statistics of a (K × n) sample matrix."""
    return JunctionStatistics.from_activations(torch.as_tensor(X))


def test_output_method_is_registered() -> None:
    assert "output" in METHODS


@pytest.mark.parametrize("shape", [(6, 9, 200), (4, 30, 500), (40, 25, 300)])
def test_output_order_equals_numpy_greedy(rng: np.random.Generator, shape) -> None:
    m, n, K = shape
    # Correlated features of different scales, so the order is not trivial.
    X = rng.standard_normal((K, n)) @ rng.standard_normal((n, n)) * rng.uniform(0.2, 3, n)
    W = rng.standard_normal((m, n))
    stats = _stats(X)
    G = stats.second_moment().numpy()
    steps = min(n, 12)
    order = output_order(stats, torch.as_tensor(W), steps=steps)
    assert order.dtype == torch.long and sorted(order.tolist()) == list(range(n))
    assert order[:steps].tolist() == _greedy_np(G, W, steps)


def test_output_order_float32_weight_and_statistics_device(rng: np.random.Generator) -> None:
    X = rng.standard_normal((300, 10))
    W = torch.as_tensor(rng.standard_normal((3, 10)), dtype=torch.float32)
    stats = _stats(X)
    order = output_order(stats, W)
    assert order.device == stats.device
    assert order[:5].tolist() == _greedy_np(stats.second_moment().numpy(), W.double().numpy(), 5)


@pytest.mark.parametrize("trial", range(4))
def test_output_greedy_against_exhaustive_search(rng: np.random.Generator, trial: int) -> None:
    """Greedy is optimal at p = 1 and p = n, never above the optimum, and close to it between."""
    n, m = 8, 3
    X = rng.standard_normal((150, n)) @ rng.standard_normal((n, n))
    W = rng.standard_normal((m, n))
    stats = _stats(X)
    G = stats.second_moment().numpy()
    order = output_order(stats, torch.as_tensor(W)).tolist()
    total = _explained_np(G, W, list(range(n)))
    for p in range(1, n + 1):
        best = max(_explained_np(G, W, list(S)) for S in itertools.combinations(range(n), p))
        got = _explained_np(G, W, order[:p])
        assert got <= best * (1 + 1e-9)
        assert got >= 0.9 * best
        if p == 1 or p == n:
            assert got == pytest.approx(best, rel=1e-9)
    assert _explained_np(G, W, order) == pytest.approx(total, rel=1e-9)


def test_output_beats_weight_blind_methods_on_a_planted_problem(rng: np.random.Generator) -> None:
    """Features the consumer ignores must not be kept, however much variance they have."""
    K, n = 500, 10
    X = rng.standard_normal((K, n))
    X[:, 5:] *= 10.0  # large but unused
    W = np.zeros((2, n))
    W[:, :5] = rng.standard_normal((2, 5))
    stats = _stats(X)
    kept = select_neurons(stats, 5, method="output", weight=torch.as_tensor(W))
    assert kept.tolist() == [0, 1, 2, 3, 4]
    for method in ("svd_qr", "qr"):
        other = select_neurons(stats, 5, method=method)
        assert explained_output_energy(stats, torch.as_tensor(W), kept) > explained_output_energy(
            stats, torch.as_tensor(W), other
        )


def test_output_order_rank_deficient_and_dead_features(rng: np.random.Generator) -> None:
    """Duplicates and dead features come after the rank; the fit is lossless at p = rank."""
    base = rng.standard_normal((200, 4))
    X = np.concatenate([base, base[:, :2] * 2.0, np.zeros((200, 1)), base[:, 3:] - base[:, :1]], 1)
    W = rng.standard_normal((3, X.shape[1]))
    stats = _stats(X)
    order = output_order(stats, torch.as_tensor(W))
    assert sorted(order.tolist()) == list(range(X.shape[1]))
    G = stats.second_moment().numpy()
    total = _explained_np(G, W, list(range(X.shape[1])))
    assert _explained_np(G, W, order[:4].tolist()) == pytest.approx(total, rel=1e-9)
    assert 6 in order[4:].tolist()  # the dead feature is never picked before the rank


def test_output_nested_selection_matches_per_p(rng: np.random.Generator) -> None:
    X = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    W = torch.as_tensor(rng.standard_normal((4, 12)))
    stats = _stats(X)
    order = output_order(stats, W)
    for p in (1, 5, 12):
        kept = select_neurons(stats, p, method="output", weight=W)
        assert kept.tolist() == sorted(order[:p].tolist())
        assert select_neurons(stats, p, method="output", order=order).tolist() == kept.tolist()


def test_output_wide_consumer_uses_factor(rng: np.random.Generator) -> None:
    """m > n: the QR factor of W gives the same order as W itself."""
    X = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    W = rng.standard_normal((50, 6))
    stats = _stats(X)
    assert output_order(stats, torch.as_tensor(W)).tolist()[:6] == _greedy_np(
        stats.second_moment().numpy(), W, 6
    )


def test_output_centered_uses_covariance(rng: np.random.Generator) -> None:
    X = rng.standard_normal((300, 7)) + rng.uniform(0, 5, 7)
    W = torch.as_tensor(rng.standard_normal((3, 7)))
    stats = _stats(X)
    C = stats.second_moment(centered=True).numpy()
    got = output_order(stats, W, centered=True)[:4].tolist()
    assert got == _greedy_np(C, W.numpy(), 4)


def test_output_method_errors() -> None:
    stats = _stats(np.random.default_rng(0).standard_normal((20, 5)))
    with pytest.raises(ValueError, match="needs the consumer's `weight`"):
        select_neurons(stats, 2, method="output")
    with pytest.raises(ValueError, match=r"`weight` must be the consumer's \(m × 5\)"):
        output_order(stats, torch.zeros(3, 4))


def test_junction_fitter_output_method_matches_select_neurons(rng: np.random.Generator) -> None:
    from lightning_neuronprune.core.fitting import FitOptions, JunctionFitter

    X = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    W = torch.as_tensor(rng.standard_normal((4, 12)))
    stats = _stats(X)
    fitter = JunctionFitter(stats, W, None, FitOptions(method="output"))
    fitter.prepare([3, 7])
    for p in (7, 3, 10):  # 10 extends the greedy past the first pass
        assert (
            fitter.kept(p).tolist() == select_neurons(stats, p, method="output", weight=W).tolist()
        )
    assert fitter.fit(12).kept.tolist() == list(range(12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_output_order_on_cuda_has_no_host_sync(rng: np.random.Generator) -> None:
    X = torch.as_tensor(rng.standard_normal((400, 64)) @ rng.standard_normal((64, 64)))
    W = torch.as_tensor(rng.standard_normal((10, 64)))
    stats = JunctionStatistics.from_activations(X.cuda())
    expected = output_order(_stats(X.numpy()), W, steps=40)
    G = stats.second_moment()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        order = output_order(stats, W.cuda(), steps=40, moment=G)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert order.device.type == "cuda"
    assert order.cpu().tolist() == expected.tolist()
