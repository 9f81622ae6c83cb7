"""The budgeted allocation strategy: proxy curves, paths, bisection, and the pipeline without
per-layer sweeps on a network with 30 junctions."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lit_models import blobs
from torch import nn
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import (
    ConfirmSettings,
    EnergyModel,
    JointSettings,
    ModelIO,
    ReductionSearch,
    SearchSettings,
    collect_statistics,
    find_junction,
)
from lightning_neuronprune.core.selection import explained_output_energy, nested_order
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.errors import NumericalWarning
from lightning_neuronprune.search.allocation import (
    allocation_path,
    allowed_widths,
    bisect_path,
    unexplained_share,
    uniform_path,
)

BLOCKS = 30


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class DeepMLP(nn.Module):
    """Residual MLP blocks: one plain junction fc1 → fc2 per block."""

    def __init__(self, blocks: int = BLOCKS, dim: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim, hidden) for _ in range(blocks)))
        self.head = nn.Linear(dim, 4)
        for b in self.blocks:
            nn.init.normal_(b.fc2.weight, std=0.3 / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class CountingAccuracy(MulticlassAccuracy):
    """Counts full evaluations (one ``compute`` per evaluation of the data)."""

    computes = 0

    def compute(self) -> torch.Tensor:
        type(self).computes += 1
        return super().compute()


@pytest.fixture(scope="module")
def deep() -> tuple[DeepMLP, list[Any], list[Any]]:
    torch.manual_seed(0)
    model = DeepMLP()
    train, held = blobs(1024, seed=1), blobs(512, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(120):
        x, y = train[torch.randint(0, len(train), (64,))]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    batches = [train[i : i + 256] for i in range(0, len(train), 256)]
    return model, batches, [held[i : i + 256] for i in range(0, len(held), 256)]


def _search(model: nn.Module, batches: list[Any], settings: SearchSettings) -> ReductionSearch:
    junctions = [find_junction(model, f"blocks.{i}.fc1") for i in range(BLOCKS)]
    stats = collect_statistics(model, [j.consumer for j in junctions], batches)
    return ReductionSearch(model, junctions, stats, EnergyModel(), settings, ModelIO())


def _accuracy(model: nn.Module, batches: list[Any]) -> float:
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def _unswept(result: Any) -> bool:
    """Whether every layer's points are its unreduced baseline alone (no per-layer sweep)."""
    return all(len(pts) == 1 and pts[0].p == pts[0].n for pts in result.points.values())


# ------------------------------------------------------------------ building blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unexplained_share_matches_the_pseudo_inverse_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    X = torch.randn(400, 10, dtype=dtype) @ torch.randn(10, 12, dtype=dtype)  # rank 10 of 12
    st = JunctionStatistics.from_activations(X)
    W = torch.randn(5, 12, dtype=dtype)
    order = nested_order(st)
    sets = [order[:p] for p in (12, 10, 7, 3, 1)]
    M = st.second_moment()
    total = float(torch.trace(W.double() @ M @ W.double().T))
    expected = [1 - float(explained_output_energy(st, W, S)) / total for S in sets]
    assert unexplained_share(M, W, sets) == pytest.approx(expected, abs=1e-6)
    # sets that are not nested take the per-set route
    loose = [torch.tensor([0, 1, 2]), torch.tensor([3, 4])]
    expected = [1 - float(explained_output_energy(st, W, S)) / total for S in loose]
    assert unexplained_share(M, W, loose) == pytest.approx(expected, abs=1e-6)


def test_unexplained_share_warns_without_a_cholesky_factor() -> None:
    M = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite
    W = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    with pytest.warns(NumericalWarning, match="no Cholesky factor"):
        assert unexplained_share(M, W, [torch.tensor([0, 1])]) == [1.0]
    M = torch.eye(2, dtype=torch.float64)
    M[0, 0] = float("nan")
    with pytest.warns(NumericalWarning, match="not finite"):
        assert unexplained_share(M, W, [torch.tensor([1])]) == [1.0]


def test_allowed_widths_and_paths() -> None:
    assert allowed_widths(300, multiple=128) == [300, 256, 128]
    assert allowed_widths(100, multiple=128) == [100]
    assert allowed_widths(5) == [5, 4, 3, 2, 1]
    widths = {"a": [4, 3, 2, 1], "b": [4, 3, 2, 1]}
    curves = {"a": [0, 0.5, 0.6, 0.9], "b": [0, 0.1, 0.2, 0.3]}
    path = allocation_path(widths, curves, {"a": 1.0, "b": 1.0})
    assert path[0] == {"a": 4, "b": 4} and path[-1] == {"a": 1, "b": 1}
    assert len(path) == 7  # one layer one width down per step
    assert [c["a"] for c in path[:4]] == [4, 4, 4, 4]  # the cheap layer goes first
    uni = uniform_path({"a": [8, 6, 4, 2], "b": [8, 6, 4, 2]})
    assert all(c["a"] == c["b"] for c in uni) and [c["a"] for c in uni] == [8, 6, 4, 2]
    mixed = uniform_path({"a": [8, 4], "b": [4, 2]})
    assert mixed == [{"a": 8, "b": 4}, {"a": 4, "b": 2}]
    calls: list[int] = []
    assert bisect_path(100, lambda i: calls.append(i) or i <= 37, 20) == 37
    assert len(calls) <= 7
    assert bisect_path(100, lambda i: False, 3) == 0


# ------------------------------------------------------------------ the pipeline


def _run(deep: Any, joint: JointSettings, budget: Any = 0.03, confirm: Any = None):
    model, batches, eval_batches = deep
    model = copy.deepcopy(model)
    settings = SearchSettings(max_degradation=budget, joint=joint, confirm=confirm)
    search = _search(model, batches, settings)
    CountingAccuracy.computes = 0
    result = search.run(eval_batches, CountingAccuracy(4, average="micro"), batches[0][0][:1])
    return model, search, result, CountingAccuracy.computes


def test_allocate_spends_at_most_max_evaluations_and_applies_as_evaluated(deep: Any) -> None:
    model, search, result, count = _run(deep, JointSettings("allocate", max_evaluations=12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _unswept(result)  # no per-layer sweep
    assert 1 <= len(result.joint_points) <= 12
    assert count == 1 + len(result.joint_points)  # the baseline + the search's evaluations
    print(f"allocate on {BLOCKS} junctions: {count} evaluations (1 baseline)")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    chosen = result.decision.chosen
    assert chosen is not None and chosen.accuracy_drop <= 0.03
    assert sum(chosen.config[f"blocks.{i}.fc1"] < 16 for i in range(BLOCKS)) >= 10
    search.apply(model, result.decision)
    assert _accuracy(model, deep[2]) == pytest.approx(chosen.accuracy, abs=1e-6)


def test_allocate_counts_the_confirmation_on_top(deep: Any) -> None:
    confirm = ConfirmSettings(confidence=None, reserve=0.0)
    _, _, result, count = _run(deep, JointSettings("allocate"), confirm=confirm)
    assert len(result.joint_points) <= 20
    # baseline on the search part, the search, and the held-out baseline + tried candidates
    assert count == 1 + len(result.joint_points) + 1 + len(result.confirmations)
    assert result.decision.plan


def test_allocate_uniform_and_multiple_give_what_they_say(deep: Any) -> None:
    _, _, result, _ = _run(deep, JointSettings("allocate", uniform=True), budget=0.05)
    for pt in result.joint_points:
        assert len(set(pt.config.values())) == 1
    _, _, result, _ = _run(deep, JointSettings("allocate", multiple=4), budget=0.05)
    assert result.joint_points
    for pt in result.joint_points:
        assert all(p == 16 or p % 4 == 0 for p in pt.config.values())


def test_allocate_warns_and_leaves_the_model_when_nothing_meets_the_budget(deep: Any) -> None:
    """The metric is the squared distance to the unreduced model's logits, so every lossy
    reduction degrades it, and a zero budget admits none."""
    model, batches, _ = deep
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = [(x, model(x)) for x, _ in deep[2]]
    warnings: list[str] = []
    settings = SearchSettings(max_degradation=0.0, joint=JointSettings("allocate", multiple=8))
    junctions = [find_junction(model, f"blocks.{i}.fc1") for i in range(BLOCKS)]
    stats = collect_statistics(model, [j.consumer for j in junctions], batches)
    search = ReductionSearch(
        model, junctions, stats, EnergyModel(), settings, ModelIO(warn=warnings.append)
    )
    result = search.run(reference, MeanSquaredError(), batches[0][0][:1])
    assert result.joint_points and not result.decision.plan
    assert all(pt.accuracy_drop > 0 for pt in result.joint_points)
    assert len(warnings) == 1 and "left unchanged" in warnings[0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_relative_budget_string_in_search_settings() -> None:
    s = SearchSettings(max_degradation="5%", joint=JointSettings("allocate"))
    assert (s.max_degradation, s.relative) == (0.05, True)
    assert s.absolute(2.0).max_degradation == pytest.approx(0.1)


def test_joint_settings_refuse_allocate_options_elsewhere() -> None:
    with pytest.raises(ValueError, match="`multiple` must be a positive integer"):
        JointSettings("allocate", multiple=0)
    with pytest.raises(ValueError, match="`max_evaluations` must be a positive integer"):
        JointSettings("allocate", max_evaluations=0)
    with pytest.raises(ValueError, match="apply to the 'allocate' strategy"):
        JointSettings("greedy", uniform=True)


def test_allocate_settings_from_a_mapping() -> None:
    from lightning_neuronprune.search.settings import settings_from

    joint = settings_from(JointSettings, {"strategy": "allocate", "multiple": 64}, "joint")
    assert (joint.strategy, joint.multiple, joint.uniform, joint.max_evaluations) == (
        "allocate",
        64,
        False,
        20,
    )


def test_allocate_evaluates_cheaper_fallbacks_below_the_last_within_budget(deep: Any) -> None:
    """After the bisection, the configurations 3/4 and 1/2 of the way to the last one within the
    budget are evaluated too, for a confirmation that rejects the last one."""
    _, _, result, _ = _run(deep, JointSettings("allocate", max_evaluations=20))

    def removed(pt: Any) -> int:
        return sum(16 - p for p in pt.config.values())

    within = [pt for pt in result.joint_points if pt.accuracy_drop <= 0.03]
    best = max(within, key=removed)
    assert len([pt for pt in within if removed(pt) < removed(best)]) >= 2
    last_two = sorted(result.joint_points[-2:], key=removed, reverse=True)
    assert removed(last_two[0]) == pytest.approx(0.75 * removed(best), abs=16)
    assert removed(last_two[1]) == pytest.approx(0.5 * removed(best), abs=16)
