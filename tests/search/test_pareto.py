"""Tests of :mod:`lightning_neuronprune.search.pareto`: the lowest-energy point within the budget
and the
accuracy-versus-energy Pareto front, for single-layer and joint points alike (the ``Point``
protocol), against brute-force references written independently here.

A point is better when its energy is lower and its accuracy drop (the degradation from the
baseline, in the metric's own direction) is smaller. Random points are drawn from small grids so
that ties in energy, in drop and in both occur often.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from lightning_neuronprune.cost.counting import LayerCount
from lightning_neuronprune.cost.energy import EnergyModel, EnergyReport
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.pareto import Point, choose, pareto_front
from lightning_neuronprune.search.sweep import SweepPoint

MODEL = EnergyModel()
BASELINE = 0.9

MakePoint = Callable[[int, float, float], Point]


def _energy(weights: int) -> EnergyReport:
    """The report of a single layer holding ``weights`` weights (one MAC each)."""
    return MODEL.report({"fc": LayerCount(macs=weights, weights=weights)}, output_activations=0)


def _sweep_point(weights: int, value: float, drop: float) -> SweepPoint:
    return SweepPoint(
        layer="fc1", p=weights, n=1000, accuracy=value, accuracy_drop=drop,
        energy=_energy(weights), energy_ratio=1.0, memory_ratio=1.0,
    )  # fmt: skip


def _joint_point(weights: int, value: float, drop: float) -> JointPoint:
    return JointPoint(
        config={"fc1": weights, "fc2": 7}, accuracy=value, accuracy_drop=drop,
        energy=_energy(weights), energy_ratio=1.0, memory_ratio=1.0, strategy="greedy",
    )  # fmt: skip


@dataclass(frozen=True)
class _Bare:
    """Only what :class:`Point` names."""

    accuracy: float
    accuracy_drop: float
    energy: EnergyReport


def _bare_point(weights: int, value: float, drop: float) -> _Bare:
    return _Bare(value, drop, _energy(weights))


def _mixed_point(weights: int, value: float, drop: float) -> Point:
    make = _sweep_point if weights % 2 else _joint_point
    return make(weights, value, drop)


@pytest.fixture(
    params=[_sweep_point, _joint_point, _bare_point, _mixed_point],
    ids=["sweep", "joint", "bare", "mixed"],
)
def make_point(request: pytest.FixtureRequest) -> MakePoint:
    return request.param


def _random_points(
    rng: np.random.Generator, make: MakePoint, count: int, higher_is_better: bool
) -> list[Point]:
    """Points with energies from 8 levels and metric values from 6 levels (many ties)."""
    weights = rng.integers(1, 9, size=count)
    offsets = rng.integers(-1, 5, size=count) / 100  # a drop of -0.01 is an improvement
    points = []
    for w, off in zip(weights.tolist(), offsets.tolist(), strict=True):
        value = BASELINE - off if higher_is_better else BASELINE + off
        drop = BASELINE - value if higher_is_better else value - BASELINE
        points.append(make(w, value, drop))
    return points


def _dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` in energy and drop, and better in one of them."""
    ea, eb = a.energy.total, b.energy.total
    da, db = a.accuracy_drop, b.accuracy_drop
    return ea <= eb and da <= db and (ea < eb or da < db)


def _reference_front(points: Sequence[Point]) -> list[Point]:
    """All-pairs dominance; of exact duplicates (same energy and drop) the first one listed."""
    front = []
    for i, pt in enumerate(points):
        dominated = any(_dominates(q, pt) for q in points)
        duplicate = any(
            q.energy.total == pt.energy.total and q.accuracy_drop == pt.accuracy_drop
            for q in points[:i]
        )
        if not dominated and not duplicate:
            front.append(pt)
    return sorted(front, key=lambda q: q.energy.total)


def _reference_choice(points: Sequence[Point], budget: float) -> Point | None:
    """Scan: lowest energy within the budget, then smallest drop, then the first one listed."""
    best = None
    for pt in points:
        if pt.accuracy_drop > budget:
            continue
        if best is None or (pt.energy.total, pt.accuracy_drop) < (
            best.energy.total,
            best.accuracy_drop,
        ):
            best = pt
    return best


def _ids(points: Sequence[Point] | None) -> list[int]:
    return [id(pt) for pt in points or ()]


def test_sweep_and_joint_points_are_points() -> None:
    for make in (_sweep_point, _joint_point, _bare_point):
        assert isinstance(make(3, 0.9, 0.0), Point)
    assert not isinstance(_energy(3), Point)  # no accuracy


@pytest.mark.parametrize("higher_is_better", [True, False], ids=["accuracy", "loss"])
@pytest.mark.parametrize("trial", range(4))
def test_pareto_front_equals_all_pairs_reference(
    seed: int, make_point: MakePoint, trial: int, higher_is_better: bool
) -> None:
    rng = np.random.default_rng([seed, trial])
    points = _random_points(rng, make_point, 30, higher_is_better)
    front = pareto_front(points)
    assert _ids(front) == _ids(_reference_front(points))
    # by increasing energy, each point strictly better in drop than the one before
    energies = [pt.energy.total for pt in front]
    drops = [pt.accuracy_drop for pt in front]
    assert energies == sorted(energies) and len(set(energies)) == len(energies)
    assert all(b < a for a, b in zip(drops, drops[1:], strict=False))
    # every point is on the front or dominated by (or equal to) a front point
    for pt in points:
        assert any(
            q is pt
            or _dominates(q, pt)
            or (q.energy.total, q.accuracy_drop) == (pt.energy.total, pt.accuracy_drop)
            for q in front
        )


@pytest.mark.parametrize("higher_is_better", [True, False], ids=["accuracy", "loss"])
@pytest.mark.parametrize("trial", range(4))
def test_choose_equals_scan_reference(
    seed: int, make_point: MakePoint, trial: int, higher_is_better: bool
) -> None:
    rng = np.random.default_rng([seed, trial])
    points = _random_points(rng, make_point, 30, higher_is_better)
    front = pareto_front(points)
    for budget in (-0.02, -0.01, 0.0, 0.005, 0.01, 0.02, 0.04, 1.0):
        chosen = choose(points, budget)
        expected = _reference_choice(points, budget)
        assert chosen is expected
        if chosen is not None:
            assert chosen.accuracy_drop <= budget
            assert any(q is chosen for q in front)  # the choice is always on the front


def test_choose_by_hand(make_point: MakePoint) -> None:
    a = make_point(1, 0.80, 0.10)  # cheapest, drop too large for 0.05
    b = make_point(2, 0.86, 0.04)
    c = make_point(2, 0.88, 0.02)  # same energy as b, smaller drop
    d = make_point(5, 0.90, 0.00)
    points = [a, b, c, d]
    assert choose(points, 0.05) is c  # lowest energy within the budget; the tie to c
    assert choose(points, 0.02) is c  # the budget is inclusive
    assert choose(points, 0.10) is a
    assert choose(points, 0.0) is d
    assert choose(points, -0.001) is None  # nothing within
    assert choose([], 0.5) is None
    assert choose(iter(points), 0.05) is c  # any iterable, read once
    twin = make_point(2, 0.88, 0.02)
    assert choose([a, twin, b, c], 0.05) is twin  # exact ties: the first one listed


def test_pareto_front_by_hand(make_point: MakePoint) -> None:
    a = make_point(1, 0.80, 0.10)
    b = make_point(2, 0.86, 0.04)
    c = make_point(2, 0.88, 0.02)  # dominates b
    d = make_point(3, 0.85, 0.05)  # dominated by c
    e = make_point(5, 0.90, 0.00)
    f = make_point(6, 0.90, 0.00)  # dominated by e (more energy, same drop)
    assert _ids(pareto_front([f, e, d, c, b, a])) == _ids([a, c, e])
    assert pareto_front([]) == []
    assert _ids(pareto_front(iter([b]))) == _ids([b])


def test_loss_metric_front_keeps_the_smaller_loss() -> None:
    """For a loss (``higher_is_better=False``) the ``accuracy`` field holds the loss: the front and
    the tie-break follow the drop, not the raw value."""
    cheap = _sweep_point(1, 0.50, 0.30)  # loss 0.50, baseline 0.20
    better = _sweep_point(2, 0.25, 0.05)
    worse = _sweep_point(2, 0.40, 0.20)  # same energy as `better`, larger loss
    assert _ids(pareto_front([cheap, worse, better])) == _ids([cheap, better])
    assert choose([worse, better], 0.3) is better
