"""The joint strategies (joint_strategies.py): greedy and sequential, through a JointSearch."""

from __future__ import annotations

import copy

import pytest
from lit_models import holds_statistics, trained_joint_search, val_accuracy

from lightning_neuronprune import read_plan
from lightning_neuronprune.search.pareto import pareto_front
from lightning_neuronprune.search.strategies import greedy, sequential


@pytest.mark.parametrize("strategy", ["greedy", "sequential"])
def test_strategies_respect_the_budget_on_the_evaluation_set(strategy: str) -> None:
    model, search, junctions = trained_joint_search()
    budget = 0.03
    points = greedy(search, budget) if strategy == "greedy" else sequential(search, budget)
    assert points and {pt.strategy for pt in points} <= {"greedy", "greedy+refit", "sequential"}
    within = [pt for pt in points if pt.accuracy_drop <= budget]
    best = min(within, key=lambda pt: pt.energy.total)
    assert best.energy_ratio > 1.5
    applied = copy.deepcopy(model)
    search.apply(applied, best)
    assert not any(holds_statistics(pt) for pt in points)
    # The applied model scores on the evaluation set exactly what the search measured.
    assert val_accuracy(applied) == pytest.approx(best.accuracy, abs=1e-6)
    assert search.baseline.accuracy - val_accuracy(applied) <= budget + 1e-9
    assert len(read_plan(applied)) == sum(
        p < n for p, n in zip(best.config.values(), (12, 24, 16), strict=True)
    )


def test_pareto_front_is_not_dominated() -> None:
    _, search, _ = trained_joint_search()
    points = greedy(search, 0.05)
    front = pareto_front(points)
    for f in front:
        for q in points:
            dominated = (
                q.energy.total <= f.energy.total
                and q.accuracy >= f.accuracy
                and (q.energy.total < f.energy.total or q.accuracy > f.accuracy)
            )
            assert not dominated, (f.label, q.label)
    energies = [f.energy.total for f in front]
    assert energies == sorted(energies)


def test_sequential_rejects_bad_order_and_shares() -> None:
    _, search, _ = trained_joint_search()
    with pytest.raises(ValueError, match="`order` must be a permutation"):
        sequential(search, 0.02, order=["net.0"])
    with pytest.raises(ValueError, match="`shares` must be 3 non-negative numbers"):
        sequential(search, 0.02, shares=[1.0, -1.0, 1.0])
