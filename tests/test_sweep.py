from __future__ import annotations

import pytest
import torch
from torch import nn
from torchmetrics import MeanSquaredError, Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune.energy import EnergyModel
from lightning_neuronprune.statistics import collect_statistics
from lightning_neuronprune.surgery import find_junction
from lightning_neuronprune.sweep import (
    CachedEvaluator,
    batch_target,
    choose,
    degradation,
    model_output,
    sweep_junction,
)


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
