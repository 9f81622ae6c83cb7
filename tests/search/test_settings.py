"""Tests of :mod:`lightning_neuronprune.search.settings`: every refused value raises ``ValueError``
naming the field in backticks and the bad value; accepted values pass; LightningCLI builds the
callback's settings objects from YAML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_neuronprune import (
    ConfirmSettings,
    DataOptions,
    FitOptions,
    JointSettings,
    SearchSettings,
)
from lightning_neuronprune.search.settings import parse_budget


def _named(field: str, bad: Any) -> str:
    return rf"`{re.escape(field)}`.*got {re.escape(repr(bad))}"


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("ranks", 0),
        ("ranks", "some"),
        ("ranks", []),
        ("max_degradation", -0.1),
        ("max_degradation", True),
        ("max_degradation", None),
        ("max_degradation", float("inf")),
        ("relative", 1),
        ("apply", "everything"),
        ("apply", {}),
        ("apply", {"fc1": 0}),
        ("apply", {"fc1": 1.5}),
        ("apply", {1: 2}),
        ("max_samples", 0),
        ("max_samples", 2.5),
        ("max_samples", True),
        ("joint", True),
        ("confirm", 0.5),
    ],
)
def test_search_settings_refuse(field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=_named(field, bad)):
        SearchSettings(**{field: bad})


@pytest.mark.parametrize(
    ("ranks", "entry"), [([10, 0], 0), ([0.5, 1.5], 1.5), ([1, "a"], "a"), ([2, None], None)]
)
def test_search_settings_refuse_rank_entries(ranks: list[Any], entry: Any) -> None:
    with pytest.raises(ValueError, match=_named("ranks", entry)):
        SearchSettings(ranks=ranks)


@pytest.mark.parametrize(
    ("option", "bad"),
    [("method", "lu"), ("method", None), ("affine", 1), ("ridge", -1.0), ("ridge", float("nan"))],
)
def test_fit_options_refuse(option: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=_named(option, bad)):
        FitOptions(**{option: bad})


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("fraction", -0.1),
        ("fraction", 1.0),
        ("fraction", True),
        ("fraction", "0.2"),
        ("margin", -0.001),
        ("margin", None),
        ("margin", True),
        ("confidence", 0),
        ("confidence", 1),
        ("confidence", 1.5),
        ("confidence", False),
        ("chunk", 0),
        ("chunk", 1.5),
        ("chunk", True),
        ("chunk", None),
        ("max_tries", 0),
        ("max_tries", 2.0),
        ("max_tries", False),
        ("reserve", -0.1),
        ("reserve", 1.0),
        ("reserve", None),
    ],
)
def test_confirm_settings_refuse(field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=_named(field, bad)):
        ConfirmSettings(**{field: bad})


def test_confirm_margin_must_fit_in_the_budget() -> None:
    with pytest.raises(
        ValueError, match=r"max_degradation=0\.02 × \(1 - reserve\) = 0\.015, got 0\.016"
    ):
        SearchSettings(max_degradation=0.02, confirm=ConfirmSettings(margin=0.016))
    assert SearchSettings(confirm=ConfirmSettings(margin=0.015)).confirm.margin == 0.015


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"fraction": 0},
        {"margin": 0},
        {"confidence": None},
        {"chunk": 1, "max_tries": 1},
        {"fraction": np.float32(0.25), "margin": np.float64(0.01)},
        {"confidence": np.float64(0.9), "chunk": np.int64(50)},
    ],
)
def test_confirm_settings_accept(changes: dict[str, Any]) -> None:
    settings = ConfirmSettings(**changes)
    assert SearchSettings(confirm=settings).confirm == settings


def test_confirmation_is_on_by_default_with_a_confidence_bound() -> None:
    assert ConfirmSettings() == ConfirmSettings(0.5, 0.0, 0.9, 100, 20, 0.25)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"strategy": "random"}, "`strategy` must be one of .*got 'random'"),
        ({"order": ["a"]}, "`order` and `shares` apply to the 'sequential' strategy"),
        ({"strategy": "sequential", "order": "fc1"}, _named("order", "fc1")),
        ({"strategy": "sequential", "order": []}, _named("order", [])),
        ({"strategy": "sequential", "order": ["a", "a"]}, _named("order", ["a", "a"])),
        ({"strategy": "sequential", "shares": "ab"}, _named("shares", "ab")),
        ({"strategy": "sequential", "shares": [-1.0, 2.0]}, _named("shares", [-1.0, 2.0])),
        ({"strategy": "sequential", "shares": [0, 0]}, _named("shares", [0, 0])),
        ({"strategy": "sequential", "shares": [True, 1]}, _named("shares", [True, 1])),
        ({"compensate": 1}, _named("compensate", 1)),
    ],
)
def test_joint_settings_refuse(changes: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        JointSettings(**changes)


def test_joint_settings_keep_tuples() -> None:
    joint = JointSettings("sequential", order=["b", "a"], shares=[1, 2.5])
    assert joint.order == ("b", "a") and joint.shares == (1.0, 2.5)
    assert hash(joint) == hash(JointSettings("sequential", order=("b", "a"), shares=(1.0, 2.5)))


@pytest.mark.parametrize(
    ("field", "bad"), [("input_fn", 3), ("mask_fn", "attention_mask"), ("probe_samples", 0)]
)
def test_data_options_refuse(field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=_named(field, bad)):
        DataOptions(**{field: bad})


def test_budget_forms() -> None:
    assert parse_budget(0.02) == (0.02, False)
    assert parse_budget(np.float32(0.5))[1] is False
    assert parse_budget("5%") == (0.05, True)
    assert parse_budget("1e-1%") == pytest.approx((0.001, True))
    with pytest.raises(ValueError, match="`max_degradation` as a string must be a percentage"):
        parse_budget("0.05")


def test_lightning_cli_builds_the_settings_from_yaml(tmp_path: Path) -> None:
    """The callback's settings objects come from a LightningCLI YAML config (jsonargparse)."""
    pytest.importorskip("jsonargparse")
    from lit_models import BlobsData, LitMLP
    from pytorch_lightning.cli import LightningCLI

    from lightning_neuronprune import NeuronEliminationCallback

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_neuronprune.NeuronEliminationCallback
      init_args:
        targets: [net.0]
        max_degradation: "5%"
        ranks: [0.5]
        fit: {method: qr, ridge: 0.001}
        joint: {strategy: sequential, shares: [1.0]}
        confirm: {fraction: 0.25, confidence: 0.8, chunk: 16}
        data: {probe_samples: 4}
"""
    )
    cli = LightningCLI(
        LitMLP, BlobsData, run=False, args=["--config", str(config)], save_config_callback=None
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, NeuronEliminationCallback)]
    s = callback.settings
    assert (s.max_degradation, s.relative) == (0.05, True)
    assert s.options == FitOptions(method="qr", ridge=0.001)
    assert s.joint == JointSettings("sequential", shares=(1.0,))
    assert s.confirm == ConfirmSettings(fraction=0.25, confidence=0.8, chunk=16)
    assert callback.data == DataOptions(probe_samples=4)
