"""Compensating re-fits against the plain Eq. 6 and the original network's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from lit_models import trained_joint_search, val_accuracy
from torch import nn

from lightning_neuronprune import collect_statistics, find_junction
from lightning_neuronprune.core.selection import output_order
from lightning_neuronprune.errors import StatisticsError
from lightning_neuronprune.search.compensation import (
    collect_cross_statistics,
    compensate_junction,
    compensated_order,
)
from lightning_neuronprune.search.elimination import reduce_junction
from lightning_neuronprune.search.strategies import greedy


def _chain(generator: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4)
    ).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=generator, dtype=torch.float64)
                )
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=torch.float64))
    return model


def _data(generator: torch.Generator, n: int = 600) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, 10, generator=generator, dtype=torch.float64)
    return [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb in x.split(200)]


def test_without_earlier_reduction_it_is_the_output_method(generator: torch.Generator) -> None:
    model = _chain(generator)
    data = _data(generator)
    j = find_junction(model, "0")
    cs = collect_cross_statistics(model, copy.deepcopy(model), j.consumer, data)
    stats = collect_statistics(model, [j.consumer], data)[j.consumer]
    torch.testing.assert_close(cs.cross, stats.gram)
    W = model.get_submodule(j.consumer).weight
    assert compensated_order(cs, W).tolist() == output_order(stats, W).tolist()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compensate_junction(a, j, cs, 6)
    reduce_junction(b, j, stats, 6, method="output")
    torch.testing.assert_close(a[2].weight, b[2].weight)
    torch.testing.assert_close(a[0].weight, b[0].weight)


def test_compensating_fit_beats_plain_refit_on_the_consumer_output(
    generator: torch.Generator,
) -> None:
    """Same kept sets; after a lossy first junction the compensating fit of the second junction
    reproduces the original network's logits better on the fitting data (least squares)."""
    model = _chain(generator)
    data = _data(generator)
    x = torch.cat([xb for xb, _ in data])
    j0, j1 = find_junction(model, "0"), find_junction(model, "2")
    first = copy.deepcopy(model)
    st0 = collect_statistics(model, [j0.consumer], data)[j0.consumer]
    reduce_junction(first, j0, st0, 5, method="output")  # lossy: 12 -> 5
    kept = torch.tensor([0, 2, 4, 6])
    plain, comp = copy.deepcopy(first), copy.deepcopy(first)
    st1 = collect_statistics(plain, [j1.consumer], data)[j1.consumer]
    reduce_junction(plain, j1, st1, 4, kept=kept)
    cs = collect_cross_statistics(model, comp, j1.consumer, data)
    compensate_junction(comp, j1, cs, 4, kept=kept)
    with torch.no_grad():
        y = model(x)
        err_plain = (plain(x) - y).norm()
        err_comp = (comp(x) - y).norm()
    assert err_comp < err_plain


def test_cross_statistics_refuse_mismatched_consumers(generator: torch.Generator) -> None:
    model = _chain(generator)
    other = copy.deepcopy(model)
    other[2] = nn.Linear(5, 9).double()
    with pytest.raises(StatisticsError, match="reading the same features in both"):
        collect_cross_statistics(model, other, "2", _data(generator))


@pytest.mark.parametrize("method", ["output", "svd_qr"])
def test_greedy_compensated_points_apply_exactly(seed: int, method: str) -> None:
    model, search, junctions = trained_joint_search(seed, epochs=3, method=method)
    points = greedy(search, 0.02, compensate=True, slack=0.05)
    compensated = [pt for pt in points if pt.strategy == "greedy+compensated"]
    assert compensated and all(search._fitted[id(pt)][2] for pt in compensated)
    for pt in compensated[:2]:
        applied = copy.deepcopy(model)
        search.apply(applied, pt)
        assert val_accuracy(applied.eval()) == pytest.approx(pt.accuracy, abs=1e-6)
        if method != "output":
            assert pt.kept == search.evaluate(pt.config).kept
    with pytest.raises(ValueError, match="`slack` must be non-negative"):
        greedy(search, 0.02, compensate=True, slack=-1)


@pytest.mark.parametrize("target", ["0", "2"])
def test_conv_junctions_compensate_like_the_output_method(
    generator: torch.Generator, target: str
) -> None:
    """Without an earlier reduction the compensating fit of a conv junction (conv → conv, or
    conv → flatten → Linear) is the per-tap refit with output-aware selection."""
    from lightning_neuronprune.structure.conv import statistics_channels

    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 16, 4),
    ).double()  # fmt: skip
    x = torch.randn(32, 2, 4, 4, generator=generator, dtype=torch.float64)
    data = [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb in x.split(16)]
    j = find_junction(model, target)
    channels = statistics_channels(model, [j]).get(j.consumer)
    cs = collect_cross_statistics(model, copy.deepcopy(model), j.consumer, data, channels=channels)
    stats = collect_statistics(model, [j.consumer], data, channels=statistics_channels(model, [j]))
    torch.testing.assert_close(cs.cross, stats[j.consumer].gram)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    kept = compensate_junction(a, j, cs, 4)
    rec = reduce_junction(b, j, stats[j.consumer], 4, method="output")
    assert kept.tolist() == list(rec.kept)
    cons = j.consumer
    torch.testing.assert_close(a.get_submodule(cons).weight, b.get_submodule(cons).weight)
    torch.testing.assert_close(a(x), b(x))
