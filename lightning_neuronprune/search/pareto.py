"""The accuracy-versus-energy choice: the Pareto front and the lowest-energy point in budget.

Both functions take any evaluated configuration, single-layer
(:class:`~lightning_neuronprune.search.sweep.SweepPoint`) or joint
(:class:`~lightning_neuronprune.search.joint.JointPoint`): they read only what :class:`Point` names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

from lightning_neuronprune.cost.energy import EnergyReport

__all__ = ["Point", "choose", "pareto_front", "point_label"]


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

    Ties in energy go to the smaller drop (the better metric, in its own direction: the higher
    accuracy, or the lower loss), exact ties to the first point listed. Returns ``None`` when no
    point qualifies.
    """
    ok = [pt for pt in points if pt.accuracy_drop <= max_accuracy_drop]
    if not ok:
        return None
    return min(ok, key=lambda pt: (pt.energy.total, pt.accuracy_drop))


def pareto_front(points: Iterable[P]) -> list[P]:
    """The points not dominated in (lower energy, smaller accuracy drop), by increasing energy.

    The drop, not the raw metric, ranks the points, so that a loss (``higher_is_better=False``,
    where the drop is the increase) is ranked the right way round. Of points equal in both, the
    first one listed is kept.
    """
    front: list[P] = []
    for pt in sorted(points, key=lambda q: (q.energy.total, q.accuracy_drop)):
        if not front or pt.accuracy_drop < front[-1].accuracy_drop:
            front.append(pt)
    return front


def point_label(point: Any) -> str:
    """``"fc1=40"`` for a single-layer point, ``"fc1=40, fc2=20"`` for a joint one."""
    label = getattr(point, "label", None)
    return label if label else f"{point.layer}={point.p}"
