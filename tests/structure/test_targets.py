from __future__ import annotations

import pytest
import torch
from torch import nn
from transformer_blocks import FFN, QuickGELU

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.search.validation import check_against_targets
from lightning_neuronprune.structure.targets import resolve_targets, traced_targets


def test_auto_without_example_lists_undecided_layers_and_the_probe_decides(seed: int) -> None:
    model = FFN(QuickGELU())  # untraceable forward: tracing decides nothing
    traced = resolve_targets(model, "auto")
    assert list(traced) == [] and traced.undecided == ["fc1", "fc2", "out"]
    probed = resolve_targets(model, "auto", example=torch.randn(5, 6))
    assert [(j.layer, j.consumer) for j in probed] == [("fc1", "fc2"), ("fc2", "out")]
    assert probed.undecided == []


def test_named_targets_and_target_consumer_pairs(seed: int) -> None:
    model = FFN(QuickGELU())
    with pytest.raises(UndecidedJunctionError):
        resolve_targets(model, ["fc1"])
    x = torch.randn(5, 6)
    assert resolve_targets(model, {"fc1": "fc2"}, example=x)["fc1"].consumer == "fc2"
    with pytest.raises(JunctionError, match="not the given consumer 'out'"):
        resolve_targets(model, {"fc1": "out"}, example=x)
    contexts = []

    class Context:
        def __enter__(self) -> None:
            contexts.append(1)

        def __exit__(self, *exc: object) -> None:
            return None

    resolve_targets(model, ["fc1"], example=x, forward_context=Context)
    assert contexts  # the probe's forward passes run under the given context


def test_traced_targets_wait_for_the_probe_but_refuse_what_tracing_refuses() -> None:
    untraceable = FFN(QuickGELU())
    assert list(traced_targets(untraceable, ["fc1"])) == []  # left to the probe, no error
    traceable = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    assert [j.consumer for j in traced_targets(traceable, ["0"])] == ["2"]
    with pytest.raises(JunctionError, match="'2'"):
        traced_targets(traceable, ["2"])  # the last layer's outputs have no consumer


def test_check_against_undecided_targets_refuses_only_unknown_names() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    traced = resolve_targets(model, "auto")
    assert traced.undecided == [] and traced.layers == ["0", "2"]
    with pytest.raises(ValueError, match="one share per target"):
        check_against_targets(traced, None, None, [1.0])
    partial = resolve_targets(FFN(QuickGELU()), "auto")
    # the probe may still find fc1 and fc2: no order or share count is checked yet
    assert check_against_targets(partial, {"fc1": 3}, ["fc2", "fc1"], [1.0]) is None
    with pytest.raises(ValueError, match=r"`joint_order` names \['fc9'\]"):
        check_against_targets(partial, None, ["fc1", "fc9"], None)
    with pytest.raises(ValueError, match=r"`apply` names \['nope'\]"):
        check_against_targets(partial, {"nope": 2}, None, None)
