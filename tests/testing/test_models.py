"""Tests of :mod:`lightning_neuronprune.testing.models`: the paper's reference networks as built
(layer
names, output and intermediate shapes, parameter counts checked against the arithmetic of the
architectures by hand) and the small patch transformer of the transformer example.

CaffeNet (61M parameters) is built on ``device="meta"``: shapes and counts without allocating it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neuronprune.testing.models import (
    ARCHITECTURES,
    LeNet5,
    LeNet300100,
    LitClassifier,
    LitPatchTransformer,
    PatchTransformer,
    caffenet,
    patch_mask,
)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _conv(c_in: int, c_out: int, k: int, groups: int = 1) -> int:
    return c_out * (c_in // groups) * k * k + c_out


def _shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The output shape of every named child of a ``Sequential``, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        child.register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape))
        )
        for name, child in model.named_children()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def test_lenet300100_layers_shapes_and_parameters(seed: int) -> None:
    net = LeNet300100()
    assert [name for name, _ in net.named_children()] == [
        "flatten", "fc1", "relu1", "fc2", "relu2", "fc3",
    ]  # fmt: skip
    by_hand = (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    assert by_hand == 266_610
    assert _count(net) == _linear(784, 300) + _linear(300, 100) + _linear(100, 10) == by_hand
    images = torch.randn(3, 1, 28, 28)
    out = net(images)
    assert out.shape == (3, 10)
    torch.testing.assert_close(net(images.flatten(1)), out)  # (B, 784) input too
    assert _shapes(net, images) == {
        "flatten": (3, 784), "fc1": (3, 300), "relu1": (3, 300),
        "fc2": (3, 100), "relu2": (3, 100), "fc3": (3, 10),
    }  # fmt: skip


def test_lenet5_is_caffes_variant(seed: int) -> None:
    net = LeNet5()
    # conv 5×5×1×20, pool 2; conv 5×5×20×50, pool 2; fc 800→500; ReLU; fc 500→10
    by_hand = (20 * 1 * 5 * 5 + 20) + (50 * 20 * 5 * 5 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert by_hand == 431_080
    assert _count(net) == _conv(1, 20, 5) + _conv(20, 50, 5) + _linear(800, 500) + _linear(500, 10)
    assert _count(net) == by_hand
    assert _shapes(net, torch.randn(2, 1, 28, 28)) == {
        "conv1": (2, 20, 24, 24), "pool1": (2, 20, 12, 12),
        "conv2": (2, 50, 8, 8), "pool2": (2, 50, 4, 4), "flatten": (2, 800),
        "fc1": (2, 500), "relu1": (2, 500), "fc2": (2, 10),
    }  # fmt: skip
    # as in Caffe, the only nonlinearity is between fc1 and fc2
    plain = (nn.Conv2d, nn.MaxPool2d, nn.Flatten, nn.Linear)
    assert [name for name, m in net.named_children() if not isinstance(m, plain)] == ["relu1"]


def test_caffenet_shapes_and_parameters_on_meta() -> None:
    net = caffenet(device="meta")
    assert all(p.is_meta for p in net.parameters())
    by_hand = (
        (96 * 3 * 11 * 11 + 96)
        + (256 * 48 * 5 * 5 + 256)  # groups 2: 96 / 2 inputs per filter
        + (384 * 256 * 3 * 3 + 384)
        + (384 * 192 * 3 * 3 + 384)  # groups 2
        + (256 * 192 * 3 * 3 + 256)  # groups 2
        + (9216 * 4096 + 4096)
        + (4096 * 4096 + 4096)
        + (4096 * 1000 + 1000)
    )
    assert by_hand == 60_965_224
    assert _count(net) == by_hand
    convs = {name: m for name, m in net.named_children() if isinstance(m, nn.Conv2d)}
    assert {name: m.groups for name, m in convs.items()} == {
        "conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2,
    }  # fmt: skip
    shapes = _shapes(net, torch.empty(2, 3, 227, 227, device="meta"))
    assert shapes["conv1"] == (2, 96, 55, 55)
    assert shapes["norm1"] == (2, 96, 27, 27)
    assert shapes["norm2"] == (2, 256, 13, 13)
    assert shapes["conv3"] == shapes["conv4"] == (2, 384, 13, 13)
    assert shapes["pool5"] == (2, 256, 6, 6)
    assert shapes["flatten"] == (2, 9216)
    assert shapes["fc8"] == (2, 1000)


@pytest.mark.parametrize("build", [LeNet300100, LeNet5, caffenet])
def test_factory_arguments_and_num_classes(build) -> None:
    net = build(num_classes=7, device="meta", dtype=torch.float64)
    params = list(net.parameters())
    assert params and all(p.is_meta and p.dtype == torch.float64 for p in params)
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 7


def test_lit_classifier(seed: int) -> None:
    assert set(ARCHITECTURES) == {"lenet300100", "lenet5"}
    message = r"`arch` must be one of \['lenet300100', 'lenet5'\], got 'vgg'"
    with pytest.raises(ValueError, match=message):
        LitClassifier("vgg")
    model = LitClassifier("lenet5")
    assert isinstance(model.net, LeNet5) and isinstance(model.get_submodule("net.fc1"), nn.Linear)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)
    scheduled = LitClassifier("lenet300100", lr=0.01, epochs=4).configure_optimizers()
    assert scheduled["optimizer"].param_groups[0]["lr"] == 0.01
    assert scheduled["lr_scheduler"].T_max == 4


def _reference_patch_mask(images: torch.Tensor, patch: int, threshold: float) -> torch.Tensor:
    B, _, H, W = images.shape
    mask = torch.zeros(B, (H // patch) * (W // patch), dtype=torch.long)
    for b in range(B):
        for r in range(H // patch):
            for c in range(W // patch):
                tile = images[b, 0, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
                mask[b, r * (W // patch) + c] = int(bool((tile > threshold).any()))
        if not mask[b].any():
            mask[b, 0] = 1  # a blank image keeps one token
    return mask


def test_patch_mask_against_a_loop(generator: torch.Generator) -> None:
    images = torch.full((3, 1, 28, 28), -0.4)
    images[0, 0, 5, 9] = 1.0  # one inked pixel: patch (1, 2) = token 9
    images[1] = torch.where(torch.rand(28, 28, generator=generator) > 0.9, 1.0, -0.4)
    # images[2] stays blank
    mask = patch_mask(images)
    assert mask.dtype == torch.long and mask.shape == (3, 49)
    assert mask[0].nonzero().flatten().tolist() == [9]
    assert mask[2].tolist() == [1] + [0] * 48
    assert torch.equal(mask, _reference_patch_mask(images, 4, 0.0))
    assert torch.equal(patch_mask(images, patch=7), _reference_patch_mask(images, 7, 0.0))


def test_patch_transformer_ignores_padding_tokens(generator: torch.Generator) -> None:
    net = PatchTransformer(depth=2, dim=8, heads=2, hidden=16, num_classes=5).eval()
    assert isinstance(net.get_submodule("blocks.1.mlp.fc1"), nn.Linear)
    images = torch.randn(4, 1, 28, 28, generator=generator)
    mask = (torch.rand(4, 49, generator=generator) > 0.5).long()
    mask[:, 0] = 1
    out = net({"pixel_values": images, "attention_mask": mask})
    assert out.shape == (4, 5)
    # pixels of masked-out tokens change nothing: they are padding
    pad = mask.bool().logical_not().reshape(4, 1, 7, 1, 7, 1).expand(4, 1, 7, 4, 7, 4)
    noisy = images + 10 * pad.reshape(4, 1, 28, 28) * torch.randn(images.shape, generator=generator)
    assert not torch.equal(noisy, images)
    again = net({"pixel_values": noisy, "attention_mask": mask})
    torch.testing.assert_close(again, out)
    # while the same pixels as tokens do
    full = torch.ones_like(mask)
    plain = net({"pixel_values": images, "attention_mask": full})
    assert not torch.allclose(net({"pixel_values": noisy, "attention_mask": full}), plain)


def test_lit_patch_transformer_forwards_the_batch(generator: torch.Generator) -> None:
    model = LitPatchTransformer(lr=1e-3, depth=1, dim=8, heads=2, hidden=16)
    batch = {
        "pixel_values": torch.randn(2, 1, 28, 28, generator=generator),
        "attention_mask": torch.ones(2, 49, dtype=torch.long),
        "labels": torch.tensor([1, 2]),
    }
    assert model(batch).shape == (2, 10)
    assert model.net.blocks[0].mlp.fc1.out_features == 16
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)
