"""Pieces of ``benchmarks/bench_cnn.py`` that need no data: the equal-MAC widths, the
Torch-Pruning adapter (skipped without ``torch_pruning``) and the Fashion-MNIST loader's error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench_modules import load_benchmark
from torch import nn


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_cnn")


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def _calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))]


@pytest.mark.parametrize("ratio", [1.5, 2.0])
def test_uniform_widths_meet_the_mac_ratio(bench, ratio: float) -> None:
    torch.manual_seed(0)
    net, example = bench.small_vgg().eval(), torch.randn(1, 1, 28, 28)
    base = bench.conv_macs(net, example)
    assert base == 9_144_576
    widths, frac = bench.uniform_widths(net, example, ratio)
    macs = bench.conv_macs_for_widths(net, widths, example)
    assert macs * ratio <= base
    # the next larger fraction would miss the ratio (the search keeps the largest one)
    wider = [max(1, round(n * (frac + 0.01))) for n in _widths(net)]
    assert wider == widths or bench.conv_macs_for_widths(net, wider, example) * ratio > base
    # the package's reduction to those widths has exactly those conv MACs
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    targets = dict(zip(convs, widths, strict=True))
    calib = _calib()
    stats = bench.one_shot_stats(net, convs, calib)
    reduced = bench.ours(net, targets, calib, "output", "one-shot", stats)
    assert _widths(reduced) == widths
    assert bench.conv_macs(reduced, example) == macs
    assert reduced(example).shape == (1, 10)


@pytest.mark.parametrize("importance", ["L1", "L2", "Taylor", "BN scale"])
def test_torch_pruning_adapter_on_a_random_cnn(bench, importance: str) -> None:
    if bench.tp is None:
        pytest.skip("torch_pruning is not installed")
    torch.manual_seed(0)
    net, example = bench.small_vgg().eval(), torch.randn(1, 1, 28, 28)
    widths, _ = bench.uniform_widths(net, example, 2.0)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    targets = dict(zip(convs, widths, strict=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    reduced = bench.torch_pruning(net, targets, importance, example, _calib())
    assert _widths(reduced) == widths
    assert reduced[-1].in_features == widths[-1] * 9
    assert bench.conv_macs(reduced, example) == bench.conv_macs_for_widths(net, widths, example)
    assert reduced(example).shape == (1, 10)
    # the original model is untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert _widths(net) == [16, 32, 64, 64]


def test_fashion_mnist_missing_names_the_apt_package(bench, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        bench.load_fashion_mnist(str(tmp_path))


def test_proxy_widths_meet_the_mac_ratio(bench) -> None:
    torch.manual_seed(0)
    net, example = bench.small_vgg().eval(), torch.randn(1, 1, 28, 28)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    stats = bench.one_shot_stats(net, convs, _calib())
    base = bench.conv_macs(net, example)
    widths = bench.proxy_widths(net, stats, example, 2.0)
    assert len(widths) == 4
    assert all(1 <= w <= n for w, n in zip(widths, _widths(net), strict=True))
    assert bench.conv_macs_for_widths(net, widths, example) * 2.0 <= base


@pytest.mark.parametrize("strategy", ["one-shot", "sequential"])
def test_intercept_only_where_the_consumer_does_not_pad(bench, strategy: str) -> None:
    """The ``+ intercept`` rows fit an intercept at the conv → flatten → Linear junction (no
    padding) and none at the zero-padded convs, whose biases stay absent."""
    torch.manual_seed(0)
    net, example = bench.small_vgg().eval(), torch.randn(1, 1, 28, 28)
    widths, _ = bench.uniform_widths(net, example, 2.0)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    targets = dict(zip(convs, widths, strict=True))
    calib = _calib()
    stats = bench.one_shot_stats(net, convs, calib)
    label = f"output + refit + intercept, {strategy}"
    assert label in bench.methods(False)
    reduced = bench.reduce_with(label, net, targets, calib, stats, example)
    plain = bench.reduce_with(f"output + refit, {strategy}", net, targets, calib, stats, example)
    assert _widths(reduced) == widths == _widths(plain)
    assert all(m.bias is None for m in reduced.modules() if isinstance(m, nn.Conv2d))
    assert not torch.allclose(reduced[-1].bias, plain[-1].bias)
