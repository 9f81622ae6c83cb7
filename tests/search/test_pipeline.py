"""The whole search without a Trainer: ReductionSearch, SearchSettings, ModelIO."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from lit_models import blobs
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import (
    ConfirmSettings,
    EnergyModel,
    ModelIO,
    ReductionSearch,
    SearchSettings,
    collect_statistics,
    find_junction,
)
from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.errors import StatisticsError
from lightning_neuronprune.search.confirmation import split_batches
from lightning_neuronprune.search.decision import Decision, decision_for
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.settings import DataOptions, JointSettings, parse_budget


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, list[Any], list[Any]]:
    """A small MLP trained on blobs, with training and evaluation batches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)
    )  # fmt: skip
    train, held = blobs(1024, seed=1), blobs(512, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        idx = torch.randint(0, len(train), (64,))
        x, y = train[idx]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    batches = [train[i : i + 128] for i in range(0, len(train), 128)]
    eval_batches = [held[i : i + 128] for i in range(0, len(held), 128)]
    return model, batches, eval_batches


def _accuracy(model: nn.Module, batches: list[Any]) -> float:
    """An independent reference: a full forward pass over every batch."""
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def _search(model: nn.Module, batches: list[Any], settings: SearchSettings, **io: Any):
    junctions = [find_junction(model, "0"), find_junction(model, "2")]
    stats = collect_statistics(model, [j.consumer for j in junctions], batches)
    return ReductionSearch(model, junctions, stats, EnergyModel(), settings, ModelIO(**io))


def test_run_decides_without_touching_the_model_and_apply_reproduces_the_choice(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    model, batches, eval_batches = trained
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = SearchSettings(ranks=[16, 12, 8, 6, 4], max_degradation=0.02, joint=None)
    search = _search(model, batches, settings)
    result = search.run(eval_batches, MulticlassAccuracy(4, average="micro"), batches[0][0][:1])

    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in before)
    assert set(result.points) == {"0", "2"} and result.joint_points == []
    chosen = result.decision.chosen
    assert chosen is not None and chosen.accuracy_drop <= 0.02
    assert dict(result.decision.plan) == {chosen.layer: chosen.p}
    # the choice is the lowest-energy reduced point within the budget
    within = [pt for pt in result.every if pt.p < pt.n and pt.accuracy_drop <= 0.02]
    assert chosen.energy.total == min(pt.energy.total for pt in within)

    search.apply(model, result.decision)
    widths = {"0": model[0].out_features, "2": model[2].out_features}
    assert widths[chosen.layer] == chosen.p
    assert _accuracy(model, eval_batches) == pytest.approx(chosen.accuracy, abs=1e-6)


def test_joint_point_is_applied_as_it_was_evaluated(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    model, batches, eval_batches = trained
    model = copy.deepcopy(model)
    settings = SearchSettings(ranks=[16, 12, 8, 6, 4], max_degradation=0.05, joint="greedy")
    search = _search(model, batches, settings)
    result = search.run(
        eval_batches, MulticlassAccuracy(4, average="micro"), batches[0][0][:1], train_data=batches
    )
    assert any(pt.strategy != "baseline" for pt in result.joint_points)
    joint = [pt for pt in result.joint_points if pt.strategy != "baseline"]
    best = min(joint, key=lambda pt: pt.energy.total)
    assert isinstance(best, JointPoint) and any(p < 24 for p in best.config.values())
    search.apply(model, decision_for(best, search.junctions))
    assert model[0].out_features == best.config["0"] and model[2].out_features == best.config["2"]
    assert _accuracy(model, eval_batches) == pytest.approx(best.accuracy, abs=1e-6)


def test_confirmation_keeps_only_a_point_that_held_on_the_held_out_part(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    model, batches, eval_batches = trained
    warned: list[str] = []
    settings = SearchSettings(
        ranks="all", max_degradation=0.01, joint=None,
        confirm=ConfirmSettings(0.5, confidence=None, reserve=0.0),
    )  # fmt: skip
    search = _search(model, batches, settings, warn=warned.append)
    result = search.run(eval_batches, MulticlassAccuracy(4, average="micro"), batches[0][0][:1])
    chosen = result.decision.chosen
    assert chosen is not None and not warned, "blobs reduce within 1 point"
    assert result.confirmations[-1].held and result.confirmations[-1].point is chosen
    assert all(not c.held for c in result.confirmations[:-1])
    assert result.confirmations[-1].confirmed_drop <= 0.01


def test_the_reserve_holds_back_a_share_of_the_budget(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    """A candidate holds only when its held-out drop leaves ``reserve`` of the budget unused."""
    model, batches, eval_batches = trained
    settings = SearchSettings(
        ranks="all", max_degradation=0.02, joint=None,
        confirm=ConfirmSettings(0.5, confidence=None, reserve=0.5),
    )  # fmt: skip
    result = _search(model, batches, settings).run(
        eval_batches, MulticlassAccuracy(4, average="micro"), batches[0][0][:1]
    )
    tried = result.confirmations
    assert tried and all(c.held == (c.confirmed_drop <= 0.01) for c in tried)
    assert all(c.search_drop <= 0.02 for c in tried)
    if tried[-1].held:
        assert result.decision.chosen is tried[-1].point


def test_progress_and_info_reach_the_callables(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    model, batches, eval_batches = trained
    bars: dict[str, list[int]] = {}
    lines: list[str] = []

    class Bar:
        def __init__(self, name: str) -> None:
            self.name = name

        def update(self, done: int) -> None:
            bars[self.name].append(done)

        def advance(self, steps: int = 1) -> None:
            bars[self.name].append(bars[self.name][-1] + steps if bars[self.name] else steps)

    totals: dict[str, int | None] = {}

    @contextmanager
    def progress(description: str, total: int | None, unit: str):
        totals[description] = total
        bars[description] = []
        yield Bar(description)

    settings = SearchSettings(ranks=[8, 4], max_degradation=1.0, joint="greedy")
    search = _search(model, batches, settings, info=lines.append, progress=progress)
    result = search.run(
        eval_batches, MulticlassAccuracy(4, average="micro"), batches[0][0][:1], train_data=batches
    )
    sweep = "Neuron elimination: sweep"
    assert totals[sweep] == len(result.every) == 6 and bars[sweep][-1] == 6
    joint = "Neuron elimination: joint search (greedy)"
    assert totals[joint] is None and len(bars[joint]) == len(result.joint_points)
    assert any("baseline metric" in line for line in lines)


def test_settings_refuse_bad_values_naming_them() -> None:
    with pytest.raises(ValueError, match="`strategy` must be one of .*'exhaustive'"):
        SearchSettings(joint="exhaustive")
    with pytest.raises(ValueError, match="`max_degradation` must be a non-negative number"):
        SearchSettings(max_degradation=-0.1)
    with pytest.raises(ValueError, match="`max_degradation` as a string must be a percentage"):
        SearchSettings(max_degradation="five")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`options` must be a FitOptions"):
        SearchSettings(options={"method": "qr"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`margin` must not exceed the budget"):
        SearchSettings(max_degradation=0.01, confirm=ConfirmSettings(0.5, margin=0.02))
    with pytest.raises(ValueError, match="`order` and `shares` apply to the 'sequential'"):
        SearchSettings(joint=JointSettings("greedy", shares=[0.5, 0.5]))
    with pytest.raises(ValueError, match="`fraction` must be a fraction in"):
        ConfirmSettings(1.5)
    with pytest.raises(ValueError, match="`confidence` must be None or a level"):
        ConfirmSettings(confidence=1.0)
    with pytest.raises(ValueError, match="`probe_samples` must be a positive integer, got 0"):
        DataOptions(probe_samples=0)
    with pytest.raises(ValueError, match="`input_fn` must be callable, got 3"):
        DataOptions(input_fn=3)  # type: ignore[arg-type]
    assert SearchSettings(options=FitOptions(method="qr")).options.method == "qr"
    # perplexity-sized budgets in the metric's own units, and relative ones
    assert SearchSettings(max_degradation=2.5).max_degradation == 2.5
    assert SearchSettings(joint="sequential").joint == JointSettings("sequential")


def test_parse_budget() -> None:
    assert parse_budget(0.02) == (0.02, False)
    assert parse_budget(3) == (3.0, False)
    assert parse_budget("5%") == (0.05, True)
    assert parse_budget(" 0.5 %") == (0.005, True)
    for bad in ("5", "%", "-5%", float("nan"), -1, True, None):
        with pytest.raises(ValueError, match="`max_degradation`"):
            parse_budget(bad)


def test_relative_budget_is_scaled_by_the_baseline() -> None:
    s = SearchSettings(max_degradation=0.05, relative=True, confirm=ConfirmSettings(margin=0.01))
    a = s.absolute(20.0)
    assert a.relative is False and a.max_degradation == pytest.approx(1.0)
    assert a.confirm is not None and a.confirm.margin == pytest.approx(0.2)
    assert SearchSettings(max_degradation=0.05).absolute(20.0).max_degradation == 0.05


def test_empty_decision_applies_nothing(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    model, batches, _ = trained
    model = copy.deepcopy(model)
    search = _search(model, batches, SearchSettings(joint=None))
    record = search.apply(model, Decision())
    assert record.records == [] and model[0].out_features == 24


def test_search_refuses_missing_statistics_and_empty_junctions(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    model, batches, _ = trained
    junctions = [find_junction(model, "0"), find_junction(model, "2")]
    stats = collect_statistics(model, ["2"], batches[:1])
    with pytest.raises(StatisticsError, match=r"no statistics for the consumers \['4'\]"):
        ReductionSearch(model, junctions, stats, EnergyModel(), SearchSettings())
    with pytest.raises(ValueError, match="`junctions` is empty"):
        ReductionSearch(model, [], stats, EnergyModel(), SearchSettings())
    with pytest.raises(ValueError, match="`settings` must be a SearchSettings"):
        ReductionSearch(model, junctions[:1], stats, EnergyModel(), {"joint": None})  # type: ignore[arg-type]


class Counting(MulticlassAccuracy):
    """Accuracy that counts the samples it saw in each evaluation."""

    def __init__(self) -> None:
        super().__init__(num_classes=4)
        self.sizes: list[int] = []
        self._seen = 0

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self._seen += len(target)
        super().update(preds, target)

    def compute(self) -> torch.Tensor:
        self.sizes.append(self._seen)
        self._seen = 0
        return super().compute()


@pytest.mark.parametrize("apply", [None, {"2": 8}])
def test_nothing_is_held_out_when_nothing_is_confirmed(
    trained: tuple[nn.Sequential, list[Any], list[Any]], apply: Any
) -> None:
    """With ``apply=None`` or a fixed ``{layer: p}`` there is no choice to confirm: every
    evaluation sample serves the search, whatever the confirmation settings say."""
    model, batches, eval_batches = trained
    settings = SearchSettings(
        ranks=[16, 8], joint=None, apply=apply, confirm=ConfirmSettings(fraction=0.5)
    )
    metric = Counting()
    result = _search(model, batches, settings).run(eval_batches, metric, batches[0][0][:1])
    assert metric.sizes and set(metric.sizes) == {sum(len(y) for _, y in eval_batches)}
    assert result.confirmations == []


def test_relative_budget_in_the_search(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    """A relative budget becomes ``fraction × |baseline metric|`` once the baseline is known."""
    model, batches, eval_batches = trained
    settings = SearchSettings(ranks=[16, 8, 4], joint=None, max_degradation=0.05, relative=True)
    metric = MulticlassAccuracy(4, average="micro")
    result = _search(model, batches, settings).run(eval_batches, metric, batches[0][0][:1])
    baseline = _accuracy(model, eval_batches)
    assert result.budget == pytest.approx(0.05 * baseline)
    chosen = result.decision.chosen
    assert chosen is None or chosen.accuracy_drop <= result.budget


def test_the_confirmation_runs_the_held_out_part_once_per_candidate(
    trained: tuple[nn.Sequential, list[Any], list[Any]],
) -> None:
    """With a confidence bound, each candidate (and the unreduced model) runs over the held-out
    part once: its chunks give both the per-chunk values and the value of the whole part."""
    model, batches, eval_batches = trained
    model = copy.deepcopy(model)
    inputs: list[torch.Tensor] = []  # every input of a full forward pass, reduced copies' too
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    settings = SearchSettings(
        ranks=[16, 12, 8, 6, 4], max_degradation=0.05, joint=None,
        confirm=ConfirmSettings(0.5, confidence=0.9, chunk=32),
    )  # fmt: skip
    search = _search(model, batches, settings)
    inputs.clear()  # the statistics' passes
    result = search.run(eval_batches, MulticlassAccuracy(4, average="micro"), batches[0][0][:1])
    tried = result.confirmations
    assert tried and tried[-1].held, "blobs reduce within 5 points"

    held = split_batches(eval_batches, 0.5)[1]
    passes = {tuple(row.tolist()): 0 for x, _ in held for row in x}
    for x in inputs:
        for row in x:
            key = tuple(row.tolist())
            if key in passes:
                passes[key] += 1
    assert set(passes.values()) == {1 + len(tried)}
    # the whole part's value is that of an ordinary pass over it
    search.apply(model, result.decision)
    assert tried[-1].confirmed_value == pytest.approx(_accuracy(model, held), abs=1e-6)
