from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.structure.modules import GatheredLinear
from lightning_neuronprune.structure.tracing import (
    LeafTracer,
    traced_consumer,
    traced_junction,
    traced_producer,
)


class Inner(nn.Module):
    """Its output is its own network output: the walk must leave it for the enclosing module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.inner(x))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = -h
        return self.fc2(h)


def test_the_walk_moves_outwards_to_the_consumer() -> None:
    consumer, batchnorm, path = traced_consumer(Outer(), "inner.fc")
    assert (consumer, batchnorm) == ("head", "bn")
    assert path == ("gelu", "bn (BatchNorm1d)", "relu")
    assert traced_producer(Outer(), "head") == "inner.fc"


def test_untraceable_models_give_none() -> None:
    assert traced_consumer(Untraceable(), "fc1") is None
    assert traced_producer(Untraceable(), "fc2") is None


def test_refusals() -> None:
    with pytest.raises(JunctionError, match="its output is the network output"):
        traced_consumer(Outer(), "head")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UndecidedJunctionError, match="lies 1 \\(LayerNorm\\), which mixes"):
        traced_consumer(model, "0")
    assert traced_producer(model, "2") is None


def test_gathered_linear_is_a_leaf() -> None:
    model = nn.Sequential(
        GatheredLinear(torch.tensor([0, 2]), 3, source_features=4), nn.Linear(3, 1)
    )
    graph = LeafTracer().trace(model)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert traced_consumer(model, "0")[0] == "1"


class _Gated(nn.Module):
    def __init__(self, fused: bool = False, factor: str = "linear") -> None:
        super().__init__()
        self.fused, self.factor = fused, factor
        self.gate, self.up = nn.Linear(4, 8), nn.Linear(4, 8)
        self.gate_up, self.down = nn.Linear(4, 16), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            g, u = self.gate_up(x).chunk(2, dim=-1)
            return self.down(u * torch.sigmoid(g) * g)  # SiLU written out: g is read twice
        other = self.up(x) if self.factor == "linear" else x.repeat(1, 2)
        return self.down(torch.nn.functional.gelu(self.gate(x)) * other)


def test_gated_products_are_followed() -> None:
    found = traced_junction(_Gated(), "up")
    assert (found.consumer, found.producers, found.fused) == ("down", ("gate", "up"), False)
    assert traced_producer(_Gated(), "down") == "gate"
    with pytest.raises(UndecidedJunctionError, match="does not come from an nn.Linear"):
        traced_junction(_Gated(factor="repeat"), "gate")
    with pytest.raises(JunctionError, match="halves of 'gate_up' are not multiplied"):
        traced_junction(_Gated(fused=True), "gate_up")
