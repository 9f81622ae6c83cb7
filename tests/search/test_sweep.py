from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchmetrics import MeanSquaredError, Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.search.evaluation import (
    CachedEvaluator,
    batch_target,
    degradation,
    model_output,
)
from lightning_neuronprune.search.pareto import choose
from lightning_neuronprune.search.sweep import rank_grid, sweep_junction
from lightning_neuronprune.structure.discovery import find_junction


@pytest.mark.parametrize(
    ("n", "ranks", "start", "expected"),
    [
        (5, "all", None, [5, 4, 3, 2, 1]),
        (10, 4, None, [10, 6, 2, 1]),
        (10, [3, 12, 7], None, [7, 3]),
        (10, [0.5, 0.25], None, [5, 3]),
        (10, "all", 4, [4, 3, 2, 1]),
        (8, "auto", None, list(range(8, 0, -1))),
    ],
)
def test_rank_grid(n: int, ranks, start, expected: list[int]) -> None:
    assert rank_grid(n, ranks, start=start) == expected


def test_rank_grid_auto_for_wide_layers() -> None:
    grid = rank_grid(500)
    assert grid[0] == 500 and grid[-16:] == list(range(16, 0, -1))
    assert grid == sorted(set(grid), reverse=True) and len(grid) <= 48 + 16


@pytest.mark.parametrize(
    ("ranks", "message"),
    [(0, "positive integer"), ([1.5], "fractions must lie"), ([], "must be 'auto'"), ("x", "")],
)
def test_rank_grid_refuses(ranks, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rank_grid(10, ranks)


def _redundant(generator: torch.Generator) -> nn.Sequential:
    """fc1's rows 4..7 are positive multiples of rows 0..3: relu(s z) = s relu(z), so rank 4."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for i in range(4, 8):
            model[0].weight[i] = (1 + i) * model[0].weight[i - 4]
            model[0].bias[i] = (1 + i) * model[0].bias[i - 4]
    return model


def test_sweep_starts_at_the_rank_is_lossless_there_and_restores_the_model(
    generator: torch.Generator,
) -> None:
    model = _redundant(generator)
    x = torch.randn(256, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = list(zip(x.split(64), y.split(64), strict=True))
    state = copy.deepcopy(model.state_dict())
    junction = find_junction(model, "0")
    stats = collect_statistics(model, ["2"], data)["2"]
    evaluator = CachedEvaluator(model, "2", data, MulticlassAccuracy(3, average="micro"))
    seen = []
    points = sweep_junction(
        model, junction, stats, evaluator, EnergyModel(), x[:1], ranks="all", on_point=seen.append
    )
    assert seen == points
    assert [pt.p for pt in points] == [8, 4, 3, 2, 1]  # baseline, then p from rank(X) = 4
    assert points[0].accuracy == 1.0 and points[1].accuracy == 1.0
    assert points[1].accuracy_drop == 0.0 and points[1].energy_ratio > 1.0
    assert len(points[1].kept) == 4 and len({k % 4 for k in points[1].kept}) == 4
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)


def test_sweep_stops_after_the_first_point_over_the_threshold(generator: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(256, 6, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = [(x, y)]
    junction = find_junction(model, "0")
    stats = collect_statistics(model, ["2"], data)["2"]
    evaluator = CachedEvaluator(model, "2", data, MulticlassAccuracy(3, average="micro"))
    points = sweep_junction(
        model, junction, stats, evaluator, EnergyModel(), x[:1], ranks="all",
        max_accuracy_drop=0.05, block=2,
    )  # fmt: skip
    drops = [pt.accuracy_drop for pt in points]
    assert all(d <= 0.05 for d in drops[:-1])
    assert drops[-1] > 0.05 or points[-1].p == 1


def _regression(seed: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
    x = torch.randn(256, 6)
    with torch.no_grad():
        y = model(x)  # the unreduced model is exact: baseline MSE 0
    return model, [(x[:128], y[:128]), (x[128:], y[128:])]


def _sweep(model: nn.Module, data: list, metric: Metric, threshold: float | None) -> list:
    j = find_junction(model, "0")
    stats = collect_statistics(model, [j.consumer], data)[j.consumer]
    evaluator = CachedEvaluator(model, j.consumer, data, metric)
    return sweep_junction(
        model, j, stats, evaluator, EnergyModel(), data[0][0][:1], ranks="all",
        max_accuracy_drop=threshold,
    )  # fmt: skip


def test_lower_is_better_metric_counts_an_increase_as_degradation(seed: int) -> None:
    model, data = _regression(seed)
    metric = MeanSquaredError()
    assert metric.higher_is_better is False
    points = _sweep(model, data, metric, threshold=None)
    base = points[0].accuracy
    assert base == pytest.approx(0.0, abs=1e-10)
    for pt in points[1:]:
        assert pt.accuracy_drop == pytest.approx(pt.accuracy - base)
    assert max(pt.accuracy_drop for pt in points) > 1e-3  # small p hurts
    budget = 1e-3
    best = choose(points, budget)
    assert best is not None and best.accuracy - base <= budget
    assert best.p > 1  # with the direction ignored, p = 1 (the cheapest) would "qualify"
    stopped = _sweep(model, data, MeanSquaredError(), threshold=budget)
    assert stopped[-1].accuracy_drop > budget
    assert all(pt.accuracy_drop <= budget for pt in stopped[:-1])


def test_higher_is_better_metric_counts_a_decrease_as_degradation(seed: int) -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(200, 6)
    y = model(x).argmax(-1).detach()
    data = [(x, y)]
    points = _sweep(model, data, MulticlassAccuracy(4, average="micro"), threshold=None)
    base = points[0].accuracy
    assert base == pytest.approx(1.0)
    for pt in points[1:]:
        assert pt.accuracy_drop == pytest.approx(base - pt.accuracy)
    assert max(pt.accuracy_drop for pt in points) > 0


def test_metric_direction_helpers() -> None:
    assert degradation(0.75, 0.5) == 0.25
    assert degradation(0.25, 0.5, higher_is_better=False) == 0.25

    class Unset(Metric):
        def update(self) -> None: ...
        def compute(self) -> torch.Tensor:
            return torch.tensor(0.0)

    model = nn.Linear(2, 2)
    assert CachedEvaluator(
        model, "", [(torch.zeros(1, 2), 0)], Unset(), cache=False
    ).higher_is_better


def test_dict_batches_and_model_outputs() -> None:
    logits = torch.randn(2, 3)

    class Out(dict):
        @property
        def logits(self) -> torch.Tensor:
            return self["logits"]

    assert model_output(Out(logits=logits, loss=torch.tensor(1.0))) is logits
    assert model_output({"logits": logits}) is logits
    assert model_output((logits, None)) is logits
    assert batch_target({"input_ids": 1, "labels": logits}) is logits


@pytest.mark.parametrize("target", ["0", "4"])
def test_conv_sweep_matches_the_reduced_networks(seed: int, target: str) -> None:
    """conv → BN → ReLU → pool → conv → ReLU → flatten → Linear; channels 6, 7 of the first conv
    copy channels 0, 1. Every point's metric is that of the network reduced to its kept set."""
    from lightning_neuronprune.search.elimination import eliminate_neurons
    from lightning_neuronprune.structure.conv import statistics_channels

    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 5, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
        nn.Linear(5 * 9, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight[6:] = model[0].weight[:2]
        model[0].bias[6:] = model[0].bias[:2]
    x = torch.randn(64, 2, 6, 6)
    with torch.no_grad():
        y = model(x)
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    j = find_junction(model, target)
    stats = collect_statistics(model, [j.consumer], data, channels=statistics_channels(model, [j]))[
        j.consumer
    ]
    state = copy.deepcopy(model.state_dict())
    evaluator = CachedEvaluator(model, j.consumer, data, MeanSquaredError())
    points = sweep_junction(model, j, stats, evaluator, EnergyModel(), x[:1], ranks="all")
    assert evaluator.cached and points[0].p == j.num_features
    if target == "0":
        assert points[1].p == 6 and points[1].accuracy == pytest.approx(0.0, abs=1e-9)
    for pt in points[1:]:
        assert pt.energy_ratio > 1.0
        reduced, _ = eliminate_neurons(model, target, pt.p, stats=stats, kept={target: pt.kept})
        mse = float(((reduced(x) - y) ** 2).mean().detach())
        assert pt.accuracy == pytest.approx(mse, rel=1e-4, abs=1e-9)
    now = model.state_dict()
    assert all(torch.equal(now[k], state[k]) for k in state)
