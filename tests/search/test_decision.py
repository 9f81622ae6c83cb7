from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.search.decision import Decision, apply_decision, decide
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.sweep import SweepPoint
from lightning_neuronprune.structure.discovery import find_junction


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def _energy(model: nn.Module):
    return EnergyModel().estimate(model, torch.zeros(1, 6))


def test_joint_choice_plans_only_the_changed_layers() -> None:
    model = _model()
    junctions = [find_junction(model, "0"), find_junction(model, "2")]
    e = _energy(model)
    cheap = dataclasses.replace(e, total=e.total / 2)
    joint = JointPoint(
        {"0": 8, "2": 3}, 0.9, 0.01, cheap, 2.0, 2.0, "greedy", kept={"2": (0, 1, 4)}
    )
    decision = decide([], [joint], junctions, "max_energy_saving", 0.02)
    assert decision.chosen is joint
    assert dict(decision.plan) == {"2": 3} and dict(decision.kept) == {"2": (0, 1, 4)}
    with pytest.raises(TypeError):
        decision.plan["0"] = 1  # type: ignore[index]


def test_explicit_plan_uses_canonical_layer_names_and_swept_kept_sets() -> None:
    model = _model()
    junctions = [find_junction(model, "4:in")]  # removes the neurons of layer "2"
    e = _energy(model)
    swept = SweepPoint("2", 3, 5, 0.9, 0.0, e, 1.0, 1.0, (0, 2, 4))
    decision = decide([swept], [], junctions, {"4:in": 3}, 0.02)
    assert dict(decision.plan) == {"2": 3} and decision.chosen is swept
    assert dict(decision.kept) == {"2": (0, 2, 4)}
    with pytest.raises(JunctionError, match="not among the targets"):
        decide([], [], junctions, {"0": 3}, 0.02)
    assert decide([swept], [], junctions, None, 0.02) == Decision()


def test_apply_decision_reduces_in_place_with_the_given_kept_set(
    generator: torch.Generator,
) -> None:
    model = _model()
    junctions = [find_junction(model, "2")]
    stats = collect_statistics(model, ["4"], [torch.randn(64, 6, generator=generator)])
    decision = Decision(None, {"2": 3}, {"2": (0, 1, 3)})
    result = apply_decision(model, junctions, decision, stats)
    assert result.model is model and model[2].out_features == 3
    assert result.records[0].kept == (0, 1, 3)
    assert apply_decision(model, junctions, Decision(), stats).records == []


def test_a_decision_pickles_for_the_ddp_broadcast() -> None:
    """Every rank applies rank zero's decision, sent with ``broadcast_object_list`` (pickle)."""
    import pickle

    d = Decision(None, {"fc1": 3}, {"fc1": (0, 2, 5)})
    back = pickle.loads(pickle.dumps(d))
    assert back == d and dict(back.plan) == {"fc1": 3} and dict(back.kept) == {"fc1": (0, 2, 5)}
    with pytest.raises(TypeError):
        back.plan["fc1"] = 4  # type: ignore[index]
