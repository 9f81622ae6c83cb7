"""Conv junctions found by behaviour (structure/conv_probe.py), where tracing cannot see them."""

from __future__ import annotations

import pytest
import torch
from test_conv_junctions import TinyResNet
from torch import nn

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.search.elimination import eliminate_neurons
from lightning_neuronprune.structure.conv_probe import ConvProbe
from lightning_neuronprune.structure.discovery import find_junction
from lightning_neuronprune.testing.models import LeNet5


class Swish(nn.Module):
    """A custom activation module: no list of types knows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Untraceable(nn.Module):
    """conv → BN → Swish → pool → conv → flatten → Linear, with data-dependent control flow."""

    def __init__(self, mode: str = "plain") -> None:
        super().__init__()
        self.mode = mode
        self.a, self.bn, self.act = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), Swish()
        self.b = nn.Conv2d(6, 4, 3, padding=1, groups=2 if mode == "grouped" else 1)
        self.c = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # torch.fx cannot trace this branch
            h = nn.functional.max_pool2d(self.act(self.bn(self.a(x))), 2)
        y = self.b(h)
        if self.mode == "residual":
            y = y + h[:, :4]
        if self.mode == "two":
            y = y + self.c(h)
        return self.fc(torch.flatten(y, 1))


@pytest.fixture
def example(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(3, 2, 8, 8, generator=generator)


def test_probe_finds_what_tracing_cannot(example: torch.Tensor) -> None:
    model = Untraceable().eval()
    with pytest.raises(UndecidedJunctionError, match="give an example batch"):
        find_junction(model, "a")
    j = find_junction(model, "a", example=example)
    assert (j.kind, j.consumer, j.batchnorm, j.num_features) == ("conv", "b", "bn", 6)
    assert j.path == ("bn (BatchNorm2d)", "act (Swish)")
    j2 = find_junction(model, "b", example=example)
    assert (j2.consumer, j2.num_features) == ("fc", 4)
    reduced, _ = eliminate_neurons(model, "a", 4, data=[example], example=example)
    assert reduced.b.in_channels == 4 and reduced.bn.num_features == 4


@pytest.mark.parametrize(
    ("mode", "target", "message"),
    [
        ("residual", "b", "narrowed to 3 of 4 channels, 'fc' does not read .* residual stream"),
        ("two", "a", "feed 2 layers"),
        ("grouped", "a", "grouped or depthwise"),
        ("grouped", "b", "producer 'b' is a grouped convolution \\(groups=2\\)"),
    ],
)
def test_probe_refusals_leave_the_model(example, mode: str, target: str, message: str) -> None:
    model = Untraceable(mode).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(JunctionError, match=message):
        find_junction(model, target, example=example)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.a, nn.Conv2d) and model.a.out_channels == 6


def test_probe_agrees_with_tracing(generator: torch.Generator) -> None:
    x = torch.randn(2, 1, 28, 28, generator=generator)
    net = LeNet5()
    for target in ("conv1", "conv2"):
        assert find_junction(net, target, example=x) == find_junction(net, target)
    resnet = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16, generator=generator)
    assert find_junction(resnet, "layer2.0.conv2", example=x) == find_junction(
        resnet, "layer2.0.conv2"
    )
    with pytest.raises(JunctionError, match="residual stream"):
        find_junction(resnet, "layer1.0.conv2", example=x)
    probe = ConvProbe(resnet, x)
    with pytest.raises(JunctionError, match="feed 2 layers"):  # the probe alone sees two readers
        probe.find("layer1.0.conv2")
    probe.passes = 0
    consumer, bn, _ = probe.find("layer1.1.conv1")
    assert (consumer, bn) == ("layer1.1.conv2", "layer1.1.bn1")
    assert probe.passes == 2 + 2 * 4  # reach and narrowing, 2⌈log₂ 12⌉ channel patterns


class InplaceAfterConv(nn.Module):
    """conv → LeakyReLU(inplace) → conv → flatten → Linear behind an untraceable branch: the
    in-place activation writes into whatever tensor the probe hands back for ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Conv2d(2, 6, 3, padding=1), nn.LeakyReLU(0.1, inplace=True)
        self.b = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # torch.fx cannot trace this branch
            h = self.act(self.a(x))
        return self.fc(torch.flatten(self.b(h), 1))


def test_an_inplace_activation_does_not_corrupt_the_baseline(example: torch.Tensor) -> None:
    model = InplaceAfterConv().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = ConvProbe(model, example)
    assert probe.find("a")[0] == "b"
    assert probe.find("b")[0] == "fc"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
