"""Tests of :mod:`lightning_neuronprune.lightning.deprecated`: the previous release's callback
arguments and attributes still work for one release, each with a ``FutureWarning``."""

from __future__ import annotations

from pathlib import Path

import pytest
from lit_models import BlobsData, LitMLP, tiny_trainer
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_neuronprune import (
    ConfirmSettings,
    DataOptions,
    FitOptions,
    JointSettings,
    NeuronEliminationCallback,
)


def _len(batch: object) -> object:
    return batch


def test_old_arguments_land_in_the_settings_objects() -> None:
    with pytest.warns(FutureWarning) as caught:
        callback = NeuronEliminationCallback(
            max_accuracy_drop=0.01, method="qr", affine=True, ridge=1e-3, joint="sequential",
            joint_shares=[1.0, 2.0], confirm_fraction=0.3, confirm_margin=0.002,
            confirm_confidence=0.95, confirm_chunk=50, confirm_max_tries=4, input_fn=_len,
            mask_fn=_len, probe_samples=3,
        )  # fmt: skip
    named = " ".join(str(w.message) for w in caught)
    for old in ("max_accuracy_drop", "method", "joint_shares", "confirm_margin", "probe_samples"):
        assert f"NeuronEliminationCallback({old}=...)" in named
    s = callback.settings
    assert (s.max_degradation, s.relative) == (0.01, False)
    assert s.options == FitOptions(method="qr", affine=True, ridge=1e-3)
    assert s.joint == JointSettings("sequential", shares=(1.0, 2.0))
    assert s.confirm == ConfirmSettings(0.3, 0.002, 0.95, 50, 4)
    assert callback.data == DataOptions(input_fn=_len, mask_fn=_len, probe_samples=3)


def test_old_confirm_fraction_none_turns_the_confirmation_off() -> None:
    with pytest.warns(FutureWarning, match="confirm_fraction"):
        callback = NeuronEliminationCallback(confirm_fraction=None)
    assert callback.settings.confirm is None


def test_bad_old_values_and_unknown_names_are_refused() -> None:
    with pytest.warns(FutureWarning), pytest.raises(MisconfigurationException, match="`ridge`"):
        NeuronEliminationCallback(ridge=-1.0)
    with pytest.raises(
        MisconfigurationException, match=r"unexpected keyword arguments \['rnaks'\]"
    ):
        NeuronEliminationCallback(rnaks="all")
    with pytest.warns(FutureWarning), pytest.raises(MisconfigurationException, match="`top_k`"):
        NeuronEliminationCallback(top_k=0)


def test_old_attributes_read_the_result(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(targets=["net.0"], ranks=[0.5], joint=None, confirm=None)
    with pytest.warns(FutureWarning, match="callback.result.decision.plan"):
        assert callback.applied == {}
    tiny_trainer(tmp_path, callback, max_epochs=1).fit(LitMLP(), datamodule=BlobsData())
    r = callback.result
    assert r is not None
    with pytest.warns(FutureWarning):
        assert callback.points == dict(r.points)
        assert callback.results == [pt.as_dict() for pt in r.every]
        assert callback.chosen is r.decision.chosen
        assert callback.joint_points == r.joint_points == []
        assert callback.confirmations == r.confirmations == []
        assert callback.applied == (dict(r.decision.plan) if r.applied else {})
