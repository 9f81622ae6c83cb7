"""Choosing a configuration from the evaluated points, and applying it: no Trainer needed.

The decision is made once, as a frozen :class:`Decision`. Reporting and applying both read it,
so the report's ``"applied"`` and the reduced model cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.search.elimination import Elimination, eliminate_neurons
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.pareto import choose
from lightning_neuronprune.search.sweep import SweepPoint
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.targets import Targets

__all__ = ["APPLY_MODES", "Decision", "apply_decision", "decide", "decision_for"]

#: The named choices of :func:`decide` (besides ``None`` and an explicit ``{layer: p}``).
APPLY_MODES = ("max_energy_saving",)


@dataclass(frozen=True)
class Decision:
    """What to do to the model, decided once from the evaluated points.

    Attributes:
        chosen: the chosen point (:class:`SweepPoint` or :class:`JointPoint`), or ``None`` (no
            point qualified, nothing to apply, or an explicit plan matching no single point).
        plan: ``{canonical layer: p}`` of the layers that change, and only those.
        kept: ``{canonical layer: kept indices}`` where the evaluation fixed them.
    """

    chosen: SweepPoint | JointPoint | None = None
    plan: Mapping[str, int] = field(default_factory=dict)
    kept: Mapping[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", MappingProxyType(dict(self.plan)))
        object.__setattr__(self, "kept", MappingProxyType(dict(self.kept)))

    def as_dict(self) -> dict[str, Any]:
        """Plain values for reports."""
        return {"plan": dict(self.plan), "chosen": _describe(self.chosen)}

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only views do not pickle; a decision crosses processes (DDP broadcast).
        return (Decision, (self.chosen, dict(self.plan), dict(self.kept)))


def _describe(point: SweepPoint | JointPoint | None) -> dict[str, Any] | None:
    return point.as_dict(kept=True) if point is not None else None


def decide(
    points: Sequence[SweepPoint],
    joint_points: Sequence[JointPoint],
    junctions: Sequence[Junction],
    apply: str | Mapping[str, int] | None,
    max_accuracy_drop: float,
) -> Decision:
    """Choose what to apply.

    Args:
        points: every single-layer point of the sweep (baselines included).
        joint_points: every joint point.
        junctions: the targets; ``apply``'s keys may name a junction by target, layer or
            consumer input (``"fc2:in"``), and are translated to the canonical layer name.
        apply: ``"max_energy_saving"`` (the lowest-energy point within ``max_accuracy_drop``,
            single-layer or joint), ``None`` (nothing), or ``{layer: p}``.
        max_accuracy_drop: the budget.

    Returns:
        The :class:`Decision`; an empty one when nothing qualifies.
    """
    if apply is None:
        return Decision()
    targets = junctions if isinstance(junctions, Targets) else Targets(junctions)
    if isinstance(apply, Mapping):
        layers = targets.canonical(apply, "`apply`")
        plan = {layer: int(p) for layer, p in zip(layers, apply.values(), strict=True)}
        plan = {k: p for k, p in plan.items() if p < targets[k].num_features}
        matching = [pt for pt in points if pt.p < pt.n and plan.get(pt.layer) == pt.p]
        kept = {pt.layer: pt.kept for pt in matching}
        chosen = matching[0] if len(plan) == 1 and matching else None
        return Decision(chosen, plan, kept)
    if apply not in APPLY_MODES:
        raise ValueError(f"`apply` must be one of {list(APPLY_MODES)}, None or {{layer: p}}")
    reduced: list[SweepPoint | JointPoint] = [pt for pt in points if pt.p < pt.n]
    reduced += list(joint_points)
    best = choose(reduced, max_accuracy_drop)
    if best is None:
        return Decision()
    return decision_for(best, targets)


def decision_for(point: SweepPoint | JointPoint, junctions: Sequence[Junction]) -> Decision:
    """The decision to apply ``point``: its changed layers, with the kept sets it was
    evaluated with."""
    targets = junctions if isinstance(junctions, Targets) else Targets(junctions)
    if isinstance(point, JointPoint):
        plan = {k: p for k, p in point.config.items() if p < targets[k].num_features}
        return Decision(point, plan, {k: point.kept[k] for k in plan})
    return Decision(point, {point.layer: point.p}, {point.layer: point.kept})


def apply_decision(
    model: nn.Module,
    junctions: Sequence[Junction],
    decision: Decision,
    stats: Mapping[str, JunctionStatistics],
    options: FitOptions | None = None,
) -> Elimination:
    """Apply ``decision`` to ``model`` in place, with the kept sets it was evaluated with.

    Args:
        model: the network (modified in place).
        junctions: the targets.
        decision: from :func:`decide`.
        stats: ``{consumer: statistics}`` each changed junction is fitted with (for a joint
            point: the statistics its strategy fitted it with).
        options: the fit options of the sweep.

    Returns:
        The :class:`~lightning_neuronprune.search.elimination.Elimination` (no records for an empty
        plan).
    """
    if not decision.plan:
        return Elimination(model, [])
    options = options or FitOptions()
    targets = junctions if isinstance(junctions, Targets) else Targets(junctions)
    changed = [targets[layer] for layer in decision.plan]
    return eliminate_neurons(
        model,
        {j.target: decision.plan[j.layer] for j in changed},
        stats={j.consumer: stats[j.consumer] for j in changed},
        kept={j.target: decision.kept[j.layer] for j in changed if j.layer in decision.kept},
        method=options.method, affine=options.affine, ridge=options.ridge, inplace=True,
        junctions=list(targets),
    )  # fmt: skip
