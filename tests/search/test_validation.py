"""Tests of :mod:`lightning_neuronprune.search.validation`: every refused value raises
``ValueError`` whose message names the argument in backticks and the bad value; accepted values
pass and return what the docstrings say (the settings objects are tested in
``test_settings.py``). (The callback's conversion to ``MisconfigurationException`` is tested in
``test_callback.py``.)
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from torch import nn

from lightning_neuronprune.search.validation import (
    check_against_targets,
    check_choice,
    check_targets,
)
from lightning_neuronprune.structure.discovery import find_junction
from lightning_neuronprune.structure.targets import Targets


def _named(argument: str, bad: Any) -> str:
    """A pattern requiring the argument in backticks, then ``got <repr of the bad value>``."""
    return rf"`{re.escape(argument)}`.*got {re.escape(repr(bad))}"


@pytest.mark.parametrize(
    "bad", [[], [""], [3], 5, {}, {"fc1": ""}, {"": "fc2"}, ["fc1", "fc1"], None]
)
def test_check_targets_refuses(bad: Any) -> None:
    with pytest.raises(ValueError, match="`targets`"):
        check_targets(bad)


def test_check_targets_names_duplicates() -> None:
    with pytest.raises(ValueError, match=r"`targets` has duplicates: \['fc1', 'fc1'\]"):
        check_targets(["fc1", "fc1"])


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("auto", "auto"),
        ("fc1", ["fc1"]),
        (("fc1", "fc2"), ["fc1", "fc2"]),
        ({"fc1": "fc2"}, {"fc1": "fc2"}),
    ],
)
def test_check_targets_returns_the_targets(targets: Any, expected: Any) -> None:
    result = check_targets(targets)
    assert result == expected and type(result) is type(expected)
    assert result is not targets or isinstance(targets, str)  # a copy, never the user's object


# ------------------------------------------------------------------------ check_against_targets


def _targets() -> Targets:
    """Layer ``0`` (6 features, named by itself) and ``2`` (5 features, named ``4:in``)."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    return Targets([find_junction(net, "0"), find_junction(net, "4:in")])


def test_check_against_targets_returns_the_order_as_layer_names() -> None:
    targets = _targets()
    assert targets.layers == ["0", "2"] and [j.target for j in targets] == ["0", "4:in"]
    assert check_against_targets(targets, None, ["4:in", "0"], [1.0, 3.0]) == ["2", "0"]
    assert check_against_targets(targets, None, ["0", "2"], None) == ["0", "2"]
    assert check_against_targets(targets, {"0": 6, "4:in": 1}, None, None) is None
    assert check_against_targets(targets, "max_energy_saving", None, None) is None


@pytest.mark.parametrize(
    ("apply", "joint_order", "joint_shares", "message"),
    [
        ({"nope": 2}, None, None, r"`apply` names 'nope', which is not among the targets"),
        ({"0": 7}, None, None, r"`apply` asks for p=7 in '0', which has only 6 features"),
        ({"4:in": 6}, None, None, r"`apply` asks for p=6 in '4:in', which has only 5 features"),
        (None, None, [1.0], r"`joint_shares` must have one share per target .*got 1: \[1\.0\]"),
        (None, ["0", "fc9"], None, r"`joint_order` names \['fc9'\]"),
        (None, ["0"], None, r"`joint_order` must be a permutation .*got \['0'\]"),
        (None, ["0", "0"], None, r"`joint_order` must be a permutation .*got \['0', '0'\]"),
        (None, ["0", "2", "4:in"], None, r"`joint_order` must be a permutation"),
    ],
)
def test_check_against_targets_refuses(
    apply: Any, joint_order: list[str] | None, joint_shares: list[float] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_against_targets(_targets(), apply, joint_order, joint_shares)


def test_check_against_undecided_targets_refuses_only_unknown_names() -> None:
    decided = _targets()
    partial = Targets([decided["0"]], undecided=["fc7"])
    # the probe may still add fc7: neither the order's length nor p is checked yet
    assert check_against_targets(partial, {"fc7": 99, "0": 99}, ["fc7"], [1.0, 2.0, 3.0]) is None
    with pytest.raises(ValueError, match=r"`apply` names \['nope'\]"):
        check_against_targets(partial, {"nope": 1}, None, None)
    with pytest.raises(ValueError, match=r"`joint_order` names \['fc9'\]"):
        check_against_targets(partial, None, ["0", "fc9"], None)


# --------------------------------------------------------------------------------- check_choice


@pytest.mark.parametrize(
    ("name", "value", "allowed", "message"),
    [
        ("weights", "first", ("last", "best"), r"`weights` .*\['last', 'best'\], got 'first'"),
        ("weights", None, ("last", "best"), r"`weights` must be one of .*got None"),
        ("joint_compensate", 1, (True, False), "`joint_compensate` must be a bool, got 1"),
        ("joint_compensate", 0, (True, False), "`joint_compensate` must be a bool, got 0"),
        ("joint_compensate", "yes", (True, False), "`joint_compensate` must be a bool, got 'yes'"),
    ],
)  # fmt: skip
def test_check_choice_refuses(
    name: str, value: Any, allowed: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_choice(name, value, allowed)


@pytest.mark.parametrize(
    ("value", "allowed"),
    [("last", ("last", "best")), (True, (True, False)), (False, (True, False))],
)
def test_check_choice_accepts(value: Any, allowed: tuple[Any, ...]) -> None:
    assert check_choice("x", value, allowed) is None
