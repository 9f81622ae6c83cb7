"""Tests of :mod:`lightning_neuronprune.core.runtime`: eval mode with every submodule's own mode
restored (also after an error), a model's device, and moving nested batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neuronprune.core.runtime import evaluating, model_device, to_device


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _mixed() -> nn.Sequential:
    """A model in train mode holding a frozen (eval) BatchNorm1d and an eval Dropout inside a
    train-mode block."""
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2))
    )
    net.train()
    net[1].eval()
    net[2][0].eval()
    return net


def test_evaluating_restores_each_submodule_mode() -> None:
    net = _mixed()
    before = _modes(net)
    assert before[""] and not before["1"] and before["2"] and not before["2.0"]
    with evaluating(net) as inside:
        assert inside is net
        assert not any(_modes(net).values())
    assert _modes(net) == before
    net.eval()  # a model in eval mode stays so
    with evaluating(net):
        pass
    assert not any(_modes(net).values())


def test_evaluating_restores_modes_after_an_error() -> None:
    net = _mixed()
    before = _modes(net)
    with pytest.raises(RuntimeError, match="boom"), evaluating(net):
        raise RuntimeError("boom")
    assert _modes(net) == before


def test_model_device() -> None:
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    buffers_only = nn.BatchNorm1d(3, affine=False, device="meta")
    assert not list(buffers_only.parameters())
    assert model_device(buffers_only) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_to_device_moves_nested_batches() -> None:
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), [torch.arange(3)]), "name": "a", "k": 3}
    moved = to_device(batch, "meta")
    assert moved["x"].is_meta and moved["pair"][0].is_meta and moved["pair"][1][0].is_meta
    assert isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)
    assert moved["name"] == "a" and moved["k"] == 3
    assert batch["x"].device.type == "cpu"  # the input is not modified
