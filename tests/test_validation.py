"""Tests of :mod:`lightning_neuronprune.search.validation`: every refused value raises
``ValueError`` whose
message names the argument in backticks and the bad value; accepted values pass and return what
the docstrings say. (The callback's conversion to ``MisconfigurationException`` is tested in
``test_callback.py``.)
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from torch import nn

from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.search.validation import (
    check_against_targets,
    check_arguments,
    check_choice,
    check_confirmation,
)
from lightning_neuronprune.structure.discovery import find_junction
from lightning_neuronprune.structure.targets import Targets

VALID: dict[str, Any] = {
    "targets": ["fc1", "fc2"],
    "ranks": "auto",
    "max_accuracy_drop": 0.02,
    "options": {"method": "svd_qr", "affine": False, "ridge": 0.0},
    "top_k": 3,
    "energy_model": None,
    "apply": "max_energy_saving",
    "max_samples": None,
    "joint": None,
    "joint_order": None,
    "joint_shares": None,
    "verbose": True,
    "adapters": {"input_fn": None},
    "probe_samples": 8,
}


def _arguments(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


def _named(argument: str, bad: Any) -> str:
    """A pattern requiring the argument in backticks, then ``got <repr of the bad value>``."""
    return rf"`{re.escape(argument)}`.*got {re.escape(repr(bad))}"


@pytest.mark.parametrize(
    ("argument", "bad"),
    [
        ("targets", []),
        ("targets", [""]),
        ("targets", [3]),
        ("targets", 5),
        ("targets", {}),
        ("targets", {"fc1": ""}),
        ("targets", {"": "fc2"}),
        ("ranks", 0),
        ("ranks", "some"),
        ("ranks", []),
        ("max_accuracy_drop", -0.1),
        ("max_accuracy_drop", 1.5),
        ("max_accuracy_drop", True),
        ("max_accuracy_drop", "0.1"),
        ("max_accuracy_drop", None),
        ("top_k", 0),
        ("top_k", 1.0),
        ("top_k", True),
        ("top_k", None),
        ("apply", "everything"),
        ("apply", {}),
        ("apply", {"fc1": 0}),
        ("apply", {"fc1": 1.5}),
        ("apply", {1: 2}),
        ("max_samples", 0),
        ("max_samples", 2.5),
        ("max_samples", True),
        ("joint", "single"),
        ("joint", True),
        ("verbose", 1),
        ("verbose", None),
        ("probe_samples", 0),
        ("probe_samples", True),
        ("probe_samples", 2.0),
    ],
)
def test_check_arguments_refuses(argument: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=_named(argument, bad)):
        check_arguments(**_arguments(**{argument: bad}))


@pytest.mark.parametrize(
    ("ranks", "entry"), [([10, 0], 0), ([0.5, 1.5], 1.5), ([1, "a"], "a"), ([2, None], None)]
)
def test_check_arguments_refuses_rank_entries(ranks: list[Any], entry: Any) -> None:
    with pytest.raises(ValueError, match=_named("ranks", entry)):
        check_arguments(**_arguments(ranks=ranks))


@pytest.mark.parametrize(
    ("option", "bad"),
    [("method", "lu"), ("method", None), ("affine", 1), ("ridge", -1.0), ("ridge", float("nan"))],
)
def test_check_arguments_refuses_fit_options(option: str, bad: Any) -> None:
    options = {**VALID["options"], option: bad}
    with pytest.raises(ValueError, match=_named(option, bad)):
        check_arguments(**_arguments(options=options))


def test_check_arguments_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match=r"`targets` has duplicates: \['fc1', 'fc1'\]"):
        check_arguments(**_arguments(targets=["fc1", "fc1"]))
    with pytest.raises(ValueError, match=r"`joint_order` has duplicates: \['fc1', 'fc1'\]"):
        check_arguments(**_arguments(joint="sequential", joint_order=["fc1", "fc1"]))


def test_check_arguments_refuses_a_non_energy_model() -> None:
    message = r"`energy_model` must be an EnergyModel, got dict \{'mac'"
    with pytest.raises(ValueError, match=message):
        check_arguments(**_arguments(energy_model={"mac": 4.6e-12}))


def test_check_arguments_refuses_a_non_callable_adapter() -> None:
    with pytest.raises(ValueError, match="`input_fn` must be callable, got 3"):
        check_arguments(**_arguments(adapters={"input_fn": 3}))


@pytest.mark.parametrize("joint", [None, "greedy"])
@pytest.mark.parametrize("extra", [{"joint_order": ["fc2", "fc1"]}, {"joint_shares": [1, 1]}])
def test_check_arguments_order_and_shares_need_the_sequential_strategy(
    joint: str | None, extra: dict[str, Any]
) -> None:
    message = f"`joint_order` and `joint_shares` apply to `joint='sequential'`, got joint={joint!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_arguments(**_arguments(joint=joint, **extra))


@pytest.mark.parametrize(
    ("argument", "bad"),
    [
        ("joint_order", "fc1"),
        ("joint_order", []),
        ("joint_order", ["fc1"]),  # two targets
        ("joint_order", ["fc1", "fc2", "fc3"]),
        ("joint_shares", "ab"),
        ("joint_shares", {"fc1": 1.0}),
        ("joint_shares", []),
        ("joint_shares", [-1.0, 2.0]),
        ("joint_shares", [0, 0]),
        ("joint_shares", [True, 1]),
    ],
)
def test_check_arguments_refuses_sequential_order_and_shares(argument: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=_named(argument, bad)):
        check_arguments(**_arguments(joint="sequential", **{argument: bad}))


@pytest.mark.parametrize("shares", [[1.0], [1.0, 1.0, 1.0]])
def test_check_arguments_refuses_one_share_per_target_otherwise(shares: list[float]) -> None:
    message = rf"`joint_shares` must have one share per target \(2\), got {len(shares)}: "
    with pytest.raises(ValueError, match=message + re.escape(repr(shares))):
        check_arguments(**_arguments(joint="sequential", joint_shares=shares))


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("auto", "auto"),
        ("fc1", ["fc1"]),
        (("fc1", "fc2"), ["fc1", "fc2"]),
        ({"fc1": "fc2"}, {"fc1": "fc2"}),
    ],
)
def test_check_arguments_returns_the_targets(targets: Any, expected: Any) -> None:
    result = check_arguments(**_arguments(targets=targets))
    assert result == expected and type(result) is type(expected)
    assert result is not targets or isinstance(targets, str)  # a copy, never the user's object


@pytest.mark.parametrize(
    "changes",
    [
        {"ranks": "all"},
        {"ranks": 3},
        {"ranks": [0.5, 10, 1]},
        {"max_accuracy_drop": 0},
        {"max_accuracy_drop": 1},
        {"options": {"method": "qr", "affine": True, "ridge": 1e-3}},
        {"top_k": 1},
        {"energy_model": EnergyModel()},
        {"apply": None},
        {"apply": {"fc1": 1, "fc2": 40}},
        {"max_samples": 1},
        {"joint": "greedy"},
        {"joint": "sequential", "joint_order": ["fc2", "fc1"], "joint_shares": [0, 2.5]},
        {"targets": "auto", "joint": "sequential", "joint_order": ["a", "b", "c"]},
        {"verbose": False},
        {"adapters": {"input_fn": len, "target_fn": None}},
        {"adapters": None},
        {"probe_samples": 1},
    ],
)
def test_check_arguments_accepts(changes: dict[str, Any]) -> None:
    check_arguments(**_arguments(**changes))


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


# --------------------------------------------------------------------------- check_confirmation

CONFIRM: dict[str, Any] = {
    "confirm_fraction": 0.2,
    "confirm_margin": 0.005,
    "confirm_confidence": 0.95,
    "confirm_chunk": 256,
    "confirm_max_tries": 3,
    "max_accuracy_drop": 0.02,
}


@pytest.mark.parametrize(
    ("argument", "bad"),
    [
        ("confirm_fraction", -0.1),
        ("confirm_fraction", 1.0),
        ("confirm_fraction", True),
        ("confirm_fraction", "0.2"),
        ("confirm_margin", -0.001),
        ("confirm_margin", 0.03),  # above max_accuracy_drop
        ("confirm_margin", None),
        ("confirm_margin", True),
        ("confirm_confidence", 0),
        ("confirm_confidence", 1),
        ("confirm_confidence", 1.5),
        ("confirm_confidence", False),
        ("confirm_chunk", 0),
        ("confirm_chunk", 1.5),
        ("confirm_chunk", True),
        ("confirm_chunk", None),
        ("confirm_max_tries", 0),
        ("confirm_max_tries", 2.0),
        ("confirm_max_tries", False),
    ],
)
def test_check_confirmation_refuses(argument: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=_named(argument, bad)):
        check_confirmation(**{**CONFIRM, argument: bad})


def test_check_confirmation_margin_message_gives_the_budget() -> None:
    with pytest.raises(ValueError, match=r"\[0, max_accuracy_drop=0\.02\], got 0\.03"):
        check_confirmation(**{**CONFIRM, "confirm_margin": 0.03})


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"confirm_fraction": None},
        {"confirm_fraction": 0},
        {"confirm_margin": 0},
        {"confirm_margin": 0.02},  # equal to the budget
        {"confirm_confidence": None},
        {"confirm_chunk": 1, "confirm_max_tries": 1},
        # numpy scalars, as `max_accuracy_drop` accepts them
        {"confirm_fraction": np.float32(0.25), "confirm_margin": np.float64(0.01)},
        {"confirm_confidence": np.float64(0.9), "confirm_chunk": np.int64(50)},
    ],
)
def test_check_confirmation_accepts(changes: dict[str, Any]) -> None:
    assert check_confirmation(**{**CONFIRM, **changes}) is None


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
