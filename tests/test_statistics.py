from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neuronprune.errors import StatisticsError
from lightning_neuronprune.statistics import JunctionStatistics, batch_input, collect_statistics


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3))


def test_gram_and_sums_match_direct_computation(generator: torch.Generator) -> None:
    model = _mlp()
    xs = [torch.randn(7, 6, generator=generator) for _ in range(4)]
    stats = collect_statistics(model, ["3"], xs)["3"]
    H = torch.relu(model[0](torch.cat(xs))).double()
    torch.testing.assert_close(stats.gram, H.T @ H, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.total, H.sum(0))
    assert stats.count == 28
    assert stats.gram.dtype == torch.float64
    torch.testing.assert_close(stats.second_moment(centered=True), torch.cov(H.T, correction=0))


def test_batch_formats_and_input_fn(generator: torch.Generator) -> None:
    model = _mlp()
    x = torch.randn(10, 6, generator=generator)
    y = torch.zeros(10)
    ref = collect_statistics(model, ["3"], [x])["3"]
    for data, fn in (
        ([(x, y)], None),
        ([[x, y]], None),
        ([{"image": x, "label": y}], None),
        ([{"pixels": x}], lambda b: b["pixels"]),
    ):
        got = collect_statistics(model, ["3"], data, input_fn=fn)["3"]
        torch.testing.assert_close(got.gram, ref.gram)
    with pytest.raises(StatisticsError, match="keys \\['pixels'\\]"):
        batch_input({"pixels": x})


def test_max_samples_truncates_last_batch(generator: torch.Generator) -> None:
    model = _mlp()
    xs = [torch.randn(8, 6, generator=generator) for _ in range(5)]
    stats = collect_statistics(model, ["3"], xs, max_samples=20)["3"]
    assert stats.count == 20
    ref = collect_statistics(model, ["3"], [torch.cat(xs)[:20]])["3"]
    torch.testing.assert_close(stats.gram, ref.gram)


def test_hooks_removed_and_mode_restored_even_on_error() -> None:
    model = _mlp().train()
    bad = torch.full((4, 6), float("nan"))
    with pytest.raises(StatisticsError, match="non-finite activations .* layer '3'"):
        collect_statistics(model, ["3"], [bad])
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    collect_statistics(model, ["3"], [torch.randn(4, 6)])
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_sequence_inputs_are_flattened_to_rows(generator: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    x = torch.randn(3, 5, 4, generator=generator)
    stats = collect_statistics(model, ["2"], [x])["2"]
    assert stats.count == 15


def test_refusals() -> None:
    model = _mlp()
    with pytest.raises(StatisticsError, match="'1' is ReLU"):
        collect_statistics(model, ["1"], [torch.randn(2, 6)])
    with pytest.raises(StatisticsError, match="'nope' is not a module"):
        collect_statistics(model, ["nope"], [torch.randn(2, 6)])
    with pytest.raises(StatisticsError, match="data iterable was empty"):
        collect_statistics(model, ["3"], [])
    with pytest.raises(StatisticsError, match="`max_samples` must be a positive integer, got 0"):
        collect_statistics(model, ["3"], [torch.randn(2, 6)], max_samples=0)
    with pytest.raises(StatisticsError, match="no samples"):
        JunctionStatistics.zeros(3).mean()


def test_memory_is_independent_of_sample_count() -> None:
    stats = JunctionStatistics.zeros(16)
    before = {id(t) for t in (stats.gram, stats.total)}
    for _ in range(10):
        stats.update(torch.randn(1000, 16))
    assert {id(t) for t in (stats.gram, stats.total)} == before
    assert stats.gram.shape == (16, 16) and stats.count == 10_000


def test_restores_each_submodule_mode(generator: torch.Generator) -> None:
    """A BatchNorm frozen with ``.eval()`` inside a model in train mode stays frozen."""
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model.train()
    model[1].eval()
    collect_statistics(model, ["3"], [torch.randn(8, 6, generator=generator)])
    assert model.training and model[0].training and model[3].training
    assert not model[1].training
