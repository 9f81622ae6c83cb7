"""Tests of :mod:`lightning_neuronprune.cost.counting` called directly (``test_energy.py`` covers
the
rules through :meth:`EnergyModel.estimate`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neuronprune.cost.counting import (
    LayerCount,
    count_conv,
    count_inference,
    count_linear,
    count_nothing,
)


def test_count_inference_is_per_inference() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    per_layer, output = count_inference(model, torch.zeros(3, 6))
    assert per_layer == {
        "0": LayerCount(macs=6 * 5, weights=30, activations=6),
        "2": LayerCount(macs=5 * 2, weights=10, activations=5),
    }
    assert output == 2


def test_given_rules_override_the_builtin_ones() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    per_layer, _ = count_inference(model, torch.zeros(1, 6), {nn.Linear: count_nothing})
    assert per_layer == {"0": LayerCount(), "2": LayerCount()}


def test_rules_called_directly() -> None:
    conv = nn.Conv2d(4, 6, kernel_size=3, groups=2)
    x = torch.zeros(2, 4, 7, 7)
    count = count_conv(conv, x, conv(x))
    assert count == LayerCount(macs=2 * 5 * 5 * 6 * 3 * 3 * 4 // 2, weights=6 * 2 * 3 * 3,
                               activations=x.numel())  # fmt: skip
    fc = nn.Linear(4, 3)
    assert count_linear(fc, torch.zeros(2, 5, 4), None) == LayerCount(120, 12, 40)


def test_bad_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="`batch_size`"):
        count_inference(nn.Linear(2, 2), torch.zeros(2, 2), batch_size=0)


def test_rms_norms_are_counted_like_layer_norm() -> None:
    class LlamaRMSNorm(nn.Module):  # a Hugging Face decoder's own class, no torch base
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    model = nn.Sequential(nn.Linear(4, 8), LlamaRMSNorm(8), nn.RMSNorm(8), nn.Linear(8, 2))
    per_layer, _ = count_inference(model, torch.randn(3, 5, 4))
    assert per_layer["1"] == per_layer["2"] == LayerCount(macs=40, weights=8, activations=40)


def test_a_mapping_input_is_passed_as_keywords() -> None:
    """A Hugging Face-style example (the first evaluation sample of dict batches) reaches a
    ``forward(input_ids, attention_mask)`` as keywords, and the batch size is read from it."""

    class Keyworded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(input_ids) * attention_mask[..., None])

    x = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)}
    per_layer, output = count_inference(Keyworded(), x)
    assert per_layer["fc"] == LayerCount(macs=5 * 4 * 3, weights=12, activations=5 * 4)
    assert output == 5 * 3
