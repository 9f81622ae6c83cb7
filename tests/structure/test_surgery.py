from __future__ import annotations

import torch
from torch import nn

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
