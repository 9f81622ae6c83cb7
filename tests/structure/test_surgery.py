from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import GatheredLinear, linear_from
from lightning_neuronprune.structure.surgery import apply_reduction


def test_apply_reduction_shapes_dtype_device() -> None:
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    j = Junction("0", "producer", "0", "3", "1", 6)
    kept = torch.tensor([1, 4])
    W_p = torch.randn(3, 2, dtype=torch.float64)
    assert apply_reduction(model, j, kept, W_p, torch.zeros(3, dtype=torch.float64)) == [
        "0",
        "1",
        "3",
    ]
    assert model[0].out_features == 2 and model[0].weight.dtype == torch.float64
    assert model[1].num_features == 2
    assert model[3].in_features == 2
    torch.testing.assert_close(model[3].weight, W_p)
    assert model(torch.randn(5, 8, dtype=torch.float64)).shape == (5, 3)


def test_gathered_linear_selects_inputs() -> None:
    layer = GatheredLinear(torch.tensor([0, 2]), 1, bias=False, source_features=3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 10.0]]))
    out = layer(torch.tensor([[1.0, 2.0, 3.0]]))
    assert out.item() == 31.0
    assert set(layer.state_dict()) == {"weight", "index"}


def test_gather_twice_composes_the_indices() -> None:
    model = nn.Sequential(nn.Linear(5, 2))
    j = Junction("0:in", "gather", None, "0", None, 5)
    W_a = torch.randn(2, 3)
    apply_reduction(model, j, torch.tensor([0, 2, 4]), W_a, None)
    W_b = torch.randn(2, 2)
    apply_reduction(model, j, torch.tensor([1, 2]), W_b, torch.ones(2))
    layer = model[0]
    assert isinstance(layer, GatheredLinear) and layer.source_features == 5
    assert layer.index.tolist() == [2, 4]
    x = torch.randn(4, 5)
    torch.testing.assert_close(model(x), x[:, [2, 4]] @ W_b.T + 1)


def test_linear_from_uses_the_given_tensors() -> None:
    weight, bias = torch.randn(3, 2), torch.randn(3)
    like = nn.Linear(2, 3).eval().requires_grad_(False)
    layer = linear_from(weight, bias, like=like)
    assert layer.weight.data_ptr() == weight.data_ptr() and layer.bias.data_ptr() == bias.data_ptr()
    assert not layer.training and not layer.weight.requires_grad


class _FusedGLU(nn.Module):
    """Phi-3's MLP: one producer of 2n outputs, ``down(up * silu(gate))`` on its halves."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.gate_up = nn.Linear(4, 2 * n)
        self.down = nn.Linear(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * torch.nn.functional.silu(gate))


def test_gated_reduction_cuts_every_producer_and_both_fused_halves() -> None:
    x = torch.randn(5, 4)
    model = _FusedGLU()
    W = model.gate_up.weight.detach().clone()
    gate, up = model.gate_up(x).chunk(2, -1)
    kept = torch.tensor([1, 4])
    W_p = model.down.weight.detach()[:, kept]
    want = (up * torch.nn.functional.silu(gate))[:, kept] @ W_p.T + model.down.bias
    j = Junction("gate_up", "gated", "gate_up", "down", None, 6, producers=("gate_up",), fused=True)
    assert apply_reduction(model, j, kept, W_p, model.down.bias.detach()) == ["gate_up", "down"]
    assert model.gate_up.out_features == 4
    torch.testing.assert_close(model.gate_up.weight, W[[1, 4, 7, 10]])
    torch.testing.assert_close(model(x), want)

    swiglu = nn.ModuleDict(
        {"gate": nn.Linear(4, 6), "up": nn.Linear(4, 6), "down": nn.Linear(6, 3)}
    )
    j = Junction("gate", "gated", "gate", "down", None, 6, producers=("gate", "up"))
    assert j.modules == ("gate", "up", "down") and j.layer == "gate"
    apply_reduction(swiglu, j, kept, torch.zeros(3, 2), None)
    assert (
        swiglu["gate"].out_features == swiglu["up"].out_features == swiglu["down"].in_features == 2
    )


def test_inconsistent_gated_junctions_are_refused() -> None:
    with pytest.raises(JunctionError, match="inconsistent gated junction"):
        Junction("gate", "gated", "gate", "down", None, 6)  # one unfused producer
    with pytest.raises(JunctionError, match="inconsistent gated junction"):
        Junction("g", "gated", "g", "down", None, 6, producers=("g", "u"), fused=True)
    with pytest.raises(JunctionError, match="inconsistent gated junction"):
        Junction("g", "gated", "g", "down", "bn", 6, producers=("g", "u"))
    assert Junction("0", "producer", "0", "2", None, 6).producers == ("0",)
    assert Junction("t", "gather", None, "2", None, 6).modules == ("2",)


def test_update_config_needs_every_ffn_at_one_width() -> None:
    from types import SimpleNamespace

    from lightning_neuronprune.structure.surgery import update_config

    def bert(widths: list[int]) -> nn.Module:
        layer = lambda p: nn.ModuleDict({  # noqa: E731
            "attention": nn.ModuleDict({"output": nn.ModuleDict({"dense": nn.Linear(8, 8)})}),
            "intermediate": nn.ModuleDict({"dense": nn.Linear(8, p)}),
            "output": nn.ModuleDict({"dense": nn.Linear(p, 8)}),
        })  # fmt: skip
        model = nn.Module()
        model.encoder = nn.ModuleDict({"layer": nn.ModuleList([layer(p) for p in widths])})
        model.config = SimpleNamespace(intermediate_size=32)
        return model

    plan = [{"consumer": f"encoder.layer.{i}.output.dense", "n": 32} for i in range(2)]
    model = bert([24, 24])
    assert update_config(model, plan) == 24 and model.config.intermediate_size == 24
    model = bert([24, 16])
    assert update_config(model, plan) is None and model.config.intermediate_size == 32
    model = bert([24, 24, 32])  # a third layer left at its width
    assert update_config(model, plan) is None
    assert update_config(nn.Linear(2, 2), plan) is None  # no config
