"""Conv junctions: found by tracing (structure/conv_tracing.py), refused with the cause named,
reduced by surgery (structure/conv.py) and replayed from a saved plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_neuronprune.core.conv import tap_matrix
from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.errors import JunctionError, StatisticsError
from lightning_neuronprune.search.elimination import eliminate_neurons
from lightning_neuronprune.structure.discovery import auto_conv_junctions, find_junction
from lightning_neuronprune.structure.persistence import load_reduced, read_plan
from lightning_neuronprune.structure.surgery import apply_reduction
from lightning_neuronprune.testing.models import LeNet5


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, by hand."""

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck, by hand."""

    def __init__(self, c_in: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_in, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 12, stride=2))
        self.layer2 = nn.Sequential(Bottleneck(12, 6))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _vgg(act: nn.Module, pool: nn.Module, mode: str = "zeros") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        act,
        pool,
        nn.Conv2d(8, 6, 3, padding=1, padding_mode=mode),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


def _randomise_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.normal_(generator=generator)
                m.bias.normal_(generator=generator)
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lenet5_conv_junctions() -> None:
    net = LeNet5()
    j1 = find_junction(net, "conv1")
    assert (j1.kind, j1.producer, j1.consumer, j1.num_features) == ("conv", "conv1", "conv2", 20)
    assert j1.path == ("pool1 (MaxPool2d)",)
    assert find_junction(net, "conv2:in") == dataclasses.replace(j1, target="conv2:in")
    j2 = find_junction(net, "conv2")
    assert (j2.consumer, j2.num_features, j2.layer) == ("fc1", 50, "conv2")
    # the paper's "FC1" (the 800 flattened features of fc1) stays a gather junction
    assert find_junction(net, "fc1:in").kind == "gather"


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.SiLU()])
@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()])
def test_conv_bn_act_pool_conv(act: nn.Module, pool: nn.Module) -> None:
    j = find_junction(_vgg(act, pool), "0")
    assert (j.kind, j.consumer, j.batchnorm, j.num_features) == ("conv", "4", "1", 8)


def test_functional_pooling_and_conv1d() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(2, 6, 3)
            self.bn = nn.BatchNorm1d(6)
            self.b = nn.Conv1d(6, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.max_pool1d(F.relu(self.bn(self.a(x))), 2)).flatten(1)

    j = find_junction(Net(), "a")
    assert (j.consumer, j.batchnorm, j.num_features) == ("b", "bn", 6)


class _ViewNet(nn.Module):
    """The older idiom: a flatten written as a view or a reshape."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if self.how == "size":
            h = h.view(h.size(0), -1)
        elif self.how == "shape":
            h = h.reshape(h.shape[0], -1)
        elif self.how == "count":
            h = h.view(-1, 4 * 9)
        elif self.how == "function":
            h = torch.reshape(h, (h.size(0), -1))
        else:
            h = h.view(h.size(0), 4, 9)[:, :, 0]
        return self.fc(h)


@pytest.mark.parametrize("how", ["size", "shape", "count", "function"])
def test_a_view_to_batch_rows_is_a_flatten(how: str) -> None:
    j = find_junction(_ViewNet(how), "conv")
    assert (j.consumer, j.num_features) == ("fc", 4)
    with pytest.raises(JunctionError, match="lies view"):
        find_junction(_ViewNet("other"), "conv")


def test_resnet_blocks_keep_inner_channels_only() -> None:
    found = {j.producer: j.consumer for j in auto_conv_junctions(TinyResNet())}
    assert found == {
        "layer1.0.conv1": "layer1.0.conv2",
        "layer1.1.conv1": "layer1.1.conv2",
        "layer2.0.conv1": "layer2.0.conv2",
        "layer2.0.conv2": "layer2.0.conv3",
    }
    j = find_junction(TinyResNet(), "layer1.1.conv1")
    assert j.batchnorm == "layer1.1.bn1"


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class _TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


def _depthwise() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))


@pytest.mark.parametrize(
    ("model", "target", "message"),
    [
        (TinyResNet(), "layer1.0.conv2", "on a residual stream: they are read by an addition"),
        (TinyResNet(), "conv1", "on a residual stream"),
        (TinyResNet(), "layer1.1.downsample.0", "on a residual stream"),
        (_depthwise(), "0", "consumer '2' is a depthwise convolution \\(groups=8\\)"),
        (_depthwise(), "2", "producer '2' is a depthwise convolution"),
        (nn.Sequential(nn.Conv2d(4, 6, 1, groups=2), nn.Conv2d(6, 2, 1)), "0", "grouped"),
        (_Cat(), "a", "concatenated with other channels \\(cat\\)"),
        (_TwoConsumers(), "a", "feed 2 layers"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(5, 2)), "0", "without a flatten"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(0), nn.Linear(5, 2)), "0", "start_dim"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(2)), "0", "LocalResponseNorm"),
        (LeNet5(), "conv1:in", "no conv feeds the input channels of 'conv1'"),
    ],
)
def test_refusals_name_the_cause_and_leave_the_model(model, target: str, message: str) -> None:
    before = _state(model)
    with pytest.raises(JunctionError, match=message):
        find_junction(model, target)
    with pytest.raises(JunctionError, match=message):
        eliminate_neurons(model, target, 1, data=[torch.zeros(1, 3, 8, 8)])
    assert _same_state(model, before)


def _duplicated(model: nn.Module, producer: str, bn: str | None = None) -> nn.Module:
    """The last 3 output channels of ``producer`` copy its first 3 (and so do the BN's)."""
    conv = model.get_submodule(producer)
    with torch.no_grad():
        conv.weight[-3:] = conv.weight[:3]
        if conv.bias is not None:
            conv.bias[-3:] = conv.bias[:3]
        if bn is not None:
            norm = model.get_submodule(bn)
            for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                t[-3:] = t[:3]
    return model


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_duplicate_channels_are_removed_losslessly(
    generator: torch.Generator, mode: str, channels_last: bool
) -> None:
    model = _randomise_bn(_vgg(nn.ReLU(), nn.MaxPool2d(2), mode), generator)
    model = _duplicated(model, "0", "1")
    x = torch.randn(8, 3, 8, 8, generator=generator)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    before = _state(model)
    reduced, (rec,) = eliminate_neurons(model, "0", 5, data=[x])
    assert _same_state(model, before)
    assert rec.kept == (0, 1, 2, 3, 4) or len(set(rec.kept) & {0, 5}) == 1
    assert (reduced[0].out_channels, reduced[1].num_features, reduced[4].in_channels) == (5, 5, 5)
    assert reduced[4].padding_mode == mode
    if channels_last:
        assert reduced[4].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(reduced(x), model(x), rtol=1e-4, atol=1e-5)


def test_flattened_consumer_loses_the_columns_of_dropped_channels(
    generator: torch.Generator,
) -> None:
    model = _randomise_bn(_vgg(nn.ReLU(), nn.MaxPool2d(2)), generator)
    model = _duplicated(model, "4")
    x = torch.randn(8, 3, 8, 8, generator=generator)
    reduced, (rec,) = eliminate_neurons(model, "4", 3, data=[x])
    assert rec.consumer == "7" and reduced[7].in_features == 3 * 16
    assert reduced[4].out_channels == 3
    torch.testing.assert_close(reduced(x), model(x), rtol=1e-4, atol=1e-5)


def test_bottleneck_inner_channels_and_plan_replay(generator: torch.Generator, tmp_path) -> None:
    model = _randomise_bn(TinyResNet(), generator)
    x = torch.randn(4, 3, 16, 16, generator=generator)
    reduced, records = eliminate_neurons(
        model, {"layer2.0.conv1": 4, "layer2.0.conv2": 3, "layer1.1.conv1": 7}, data=[x]
    )
    assert [r.kind for r in records] == ["conv"] * 3
    assert reduced.layer2[0].conv2.weight.shape == (3, 4, 3, 3)
    assert reduced.layer2[0].conv3.in_channels == 3
    assert reduced.layer1[1].bn1.num_features == 7
    torch.save(reduced.state_dict(), tmp_path / "reduced.pt")
    fresh = load_reduced(TinyResNet(), tmp_path / "reduced.pt").eval()
    assert read_plan(fresh) == read_plan(reduced)
    torch.testing.assert_close(fresh(x), reduced(x), rtol=0, atol=0)


def test_lenet5_reduction_replays_on_a_fresh_model(generator: torch.Generator) -> None:
    model = LeNet5()
    x = torch.randn(16, 1, 28, 28, generator=generator)
    reduced, _ = eliminate_neurons(model, {"conv1": 8, "conv2": 12}, data=[x], method="output")
    assert (reduced.conv2.weight.shape, reduced.fc1.in_features) == ((12, 8, 5, 5), 12 * 16)
    fresh = load_reduced(LeNet5(), reduced.state_dict())
    torch.testing.assert_close(fresh(x), reduced(x), rtol=0, atol=0)


def test_bad_inputs_are_refused_and_leave_the_model(generator: torch.Generator) -> None:
    model = _vgg(nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(4, 3, 8, 8, generator=generator)
    before = _state(model)
    with pytest.raises(JunctionError, match="`affine` cannot be used where the consumer pads"):
        eliminate_neurons(model, "0", 4, data=[x], affine=True)
    j = find_junction(model, "0")
    W = model[4].weight.detach()
    with pytest.raises(JunctionError, match=r"must have shape \(6, 4, 3, 3\)"):
        apply_reduction(model, j, torch.arange(4), W[:, :5], None)
    with pytest.raises(JunctionError, match="increasing indices in \\[0, 8\\)"):
        apply_reduction(model, j, torch.tensor([0, 0, 1, 9]), W[:, :4], None)
    assert _same_state(model, before) and isinstance(model[0], nn.Conv2d)
    flat = collect_statistics(model, ["7"], [x])  # 96 flattened features, not 6 channels
    with pytest.raises(StatisticsError, match=r"reads 6 channels \(collect them with `channels="):
        eliminate_neurons(model, "4", 3, stats=flat)
    # an intercept is fine where the consumer pads by copying real positions
    reflect = _vgg(nn.ReLU(), nn.MaxPool2d(2), "reflect")
    reduced, (rec,) = eliminate_neurons(reflect, "0", 4, data=[x], affine=True)
    assert rec.affine and reduced[4].in_channels == 4


@pytest.mark.parametrize("head", ["avgpool", "conv1d"])
def test_global_pool_head_and_conv1d_are_lossless(generator: torch.Generator, head: str) -> None:
    if head == "avgpool":  # the head of a ResNet/VGG: conv → ReLU → global pool → flatten → fc
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
        )
        x = torch.randn(16, 3, 6, 6, generator=generator)
    else:
        model = nn.Sequential(
            nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.GELU(), nn.Conv1d(8, 2, 3, padding=1,
            padding_mode="circular"),
        )  # fmt: skip
        x = torch.randn(4, 3, 12, generator=generator)
    model = _duplicated(model.double().eval(), "0", "1" if head == "conv1d" else None)
    x = x.double()
    reduced, (rec,) = eliminate_neurons(model, "0", 5, data=[x], method="qr")
    assert rec.kind == "conv" and reduced[0].out_channels == 5
    torch.testing.assert_close(reduced(x), model(x), rtol=1e-9, atol=1e-9)


def test_output_selection_weighs_the_following_batchnorm(generator: torch.Generator) -> None:
    from lightning_neuronprune.structure.conv_fit import batchnorm_scale, channel_fitter
    from lightning_neuronprune.structure.conv_tracing import output_batchnorm

    model = _randomise_bn(TinyResNet(), generator)
    assert output_batchnorm(model, "layer1.0.conv2") == "layer1.0.bn2"
    assert output_batchnorm(model, "fc") is None
    assert output_batchnorm(_vgg(nn.ReLU(), nn.MaxPool2d(2)), "4") is None
    j = find_junction(model, "layer1.0.conv1")
    x = torch.randn(2, 3, 16, 16, generator=generator)
    stats = collect_statistics(model, [j.consumer], [x])[j.consumer]
    fitter = channel_fitter(model, j, stats, FitOptions(method="output"))
    bn = model.layer1[0].bn2
    expected = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    torch.testing.assert_close(batchnorm_scale(bn), expected.detach())
    W = model.layer1[0].conv2.weight.detach().double() * expected[:, None, None, None].detach()
    torch.testing.assert_close(fitter.weight.double(), tap_matrix(W, 8), rtol=1e-6, atol=1e-6)
