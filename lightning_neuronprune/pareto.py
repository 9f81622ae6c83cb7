"""The accuracy-versus-energy choice: the Pareto front and the lowest-energy point in budget.

Both functions take any evaluated configuration, single-layer
(:class:`~lightning_neuronprune.sweep.SweepPoint`) or joint
(:class:`~lightning_neuronprune.joint.JointPoint`): they read only what :class:`Point` names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar, runtime_checkable

from lightning_neuronprune.energy import EnergyReport

__all__ = ["Point", "choose", "pareto_front"]


@runtime_checkable
class Point(Protocol):
    """An evaluated configuration: its metric, its drop from the baseline and its energy."""

    @property
    def accuracy(self) -> float: ...

    @property
    def accuracy_drop(self) -> float: ...

    @property
    def energy(self) -> EnergyReport: ...


P = TypeVar("P", bound=Point)


def choose(points: Iterable[P], max_accuracy_drop: float) -> P | None:
    """The lowest-energy point whose accuracy drop is within ``max_accuracy_drop``.

    Ties in energy go to the higher accuracy. Returns ``None`` when no point qualifies.
    """
    ok = [pt for pt in points if pt.accuracy_drop <= max_accuracy_drop]
    if not ok:
        return None
    return min(ok, key=lambda pt: (pt.energy.total, -pt.accuracy))


def pareto_front(points: Iterable[P]) -> list[P]:
    """The points not dominated in (lower energy, higher accuracy), by increasing energy."""
    front: list[P] = []
    for pt in sorted(points, key=lambda q: (q.energy.total, -q.accuracy)):
        if not front or pt.accuracy > front[-1].accuracy:
            front.append(pt)
    return front
