from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_neuronprune import (
    GatheredLinear,
    JunctionError,
    StatisticsError,
    collect_statistics,
    eliminate_neurons,
    rebuild_shapes,
)
from lightning_neuronprune.structure.persistence import read_plan, write_plan
from lightning_neuronprune.testing.models import LeNet300100


def _redundant_mlp(generator: torch.Generator, hidden: int = 8, rank: int = 5) -> nn.Sequential:
    """fc1 has `hidden` ReLU neurons, of which `hidden - rank` are positive multiples of others."""
    model = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    with torch.no_grad():
        W, b = model[0].weight, model[0].bias
        W.copy_(torch.randn(hidden, 10, generator=generator))
        for i in range(rank, hidden):
            src, scale = i % rank, 0.5 + i  # relu(s z) = s relu(z) for s > 0
            W[i] = scale * W[src]
            b[i] = scale * b[src]
    return model


def _same_state(a: nn.Module, b: dict[str, torch.Tensor]) -> bool:
    sa = a.state_dict()
    return sa.keys() == b.keys() and all(torch.equal(sa[k], b[k]) for k in sa)


@pytest.mark.parametrize("method", ["svd_qr", "qr", "output"])
@pytest.mark.parametrize("affine", [False, True])
def test_lossless_when_features_are_linear_combinations(
    generator: torch.Generator, method: str, affine: bool
) -> None:
    model = _redundant_mlp(generator).double()
    data = [torch.randn(64, 10, generator=generator, dtype=torch.float64) for _ in range(4)]
    reduced, (record,) = eliminate_neurons(model, "0", 5, data, method=method, affine=affine)
    assert reduced[0].out_features == 5 and reduced[2].in_features == 5
    assert record.p == 5 and record.consumer == "2" and len(set(k % 5 for k in record.kept)) == 5
    x = torch.randn(256, 10, generator=generator, dtype=torch.float64)
    y, y_p = model(x), reduced(x)
    assert ((y_p - y).norm() / y.norm()).item() < 1e-5


def test_lossless_in_float32(generator: torch.Generator) -> None:
    model = _redundant_mlp(generator)
    data = [torch.randn(256, 10, generator=generator)]
    reduced, _ = eliminate_neurons(model, "0", 5, data)
    x = torch.randn(128, 10, generator=generator)
    y = model(x)
    assert ((reduced(x) - y).norm() / y.norm()).item() < 1e-5


@pytest.mark.parametrize("method", ["svd_qr", "qr", "output"])
def test_p_equal_n_reproduces_outputs(generator: torch.Generator, method: str) -> None:
    model = LeNet300100()
    data = [torch.randn(512, 1, 28, 28, generator=generator)]
    reduced, (record,) = eliminate_neurons(model, "fc1", 300, data, method=method)
    assert record.kept == tuple(range(300))
    x = torch.randn(64, 1, 28, 28, generator=generator)
    torch.testing.assert_close(reduced(x), model(x), rtol=1e-4, atol=1e-4)


def test_gather_junction_on_network_input(generator: torch.Generator) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.randn(100, 2, 3, generator=generator, dtype=torch.float64)
    x[:, 1, 2] = x[:, 0, 0] - 2 * x[:, 1, 0]  # pixel 5 is a combination of pixels 0 and 3
    reduced, (record,) = eliminate_neurons(model, "1:in", 5, [x])
    assert record.kind == "gather" and len({0, 3, 5} & set(record.kept)) == 2
    assert isinstance(reduced[1], GatheredLinear) and reduced[1].in_features == 5
    torch.testing.assert_close(reduced(x), model(x))


def test_default_copies_inplace_modifies(generator: torch.Generator) -> None:
    model = _redundant_mlp(generator)
    data = [torch.randn(64, 10, generator=generator)]
    state = copy.deepcopy(model.state_dict())
    reduced, _ = eliminate_neurons(model, "0", 5, data)
    assert reduced is not model and _same_state(model, state)
    same, _ = eliminate_neurons(model, "0", 5, data, inplace=True)
    assert same is model and model[0].out_features == 5
    assert read_plan(model)[0]["p"] == 5


def test_several_layers_and_chains(generator: torch.Generator) -> None:
    model = LeNet300100()
    data = [torch.randn(400, 1, 28, 28, generator=generator)]
    reduced, records = eliminate_neurons(model, {"fc2": 50, "fc1": 120, "fc1:in": 700}, data=data)
    assert [r.target for r in records] == ["fc1:in", "fc1", "fc2"]
    assert isinstance(reduced.fc1, GatheredLinear)
    assert (reduced.fc1.in_features, reduced.fc1.out_features) == (700, 120)
    assert (reduced.fc2.in_features, reduced.fc2.out_features) == (120, 50)
    assert reduced.fc3.in_features == 50
    assert reduced(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_stats_can_be_precomputed(generator: torch.Generator) -> None:
    model = LeNet300100()
    data = [torch.randn(300, 1, 28, 28, generator=generator)]
    stats = collect_statistics(model, ["fc2"], data)
    a, _ = eliminate_neurons(model, "fc1", 40, stats=stats)
    b, _ = eliminate_neurons(model, "fc1", 40, data)
    torch.testing.assert_close(a.fc2.weight, b.fc2.weight)


def test_rebuild_shapes_replays_the_plan(generator: torch.Generator) -> None:
    model = LeNet300100()
    data = [torch.randn(300, 1, 28, 28, generator=generator)]
    reduced, _ = eliminate_neurons(model, {"fc1:in": 500, "fc2": 30}, data=data)
    fresh = LeNet300100()
    rebuild_shapes(fresh, read_plan(reduced))
    write_plan(fresh, read_plan(reduced))
    fresh.load_state_dict(reduced.state_dict())
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(fresh(x), reduced(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layer": "fc1", "p": 0}, JunctionError, "must be an integer in \\[1, 300\\].*got 0"),
        ({"layer": "fc1", "p": 301}, JunctionError, "got 301"),
        ({"layer": "fc1", "p": 2.5}, JunctionError, "got 2.5"),
        ({"layer": "fc1"}, JunctionError, "`p` is required"),
        ({"layer": "fc3", "p": 3}, JunctionError, "could not find the consumer of 'fc3'"),
        ({"layer": {"fc1": 10, "fc2:in": 10}}, JunctionError, "name the same junction"),
        ({"layer": "fc1", "p": 10, "method": "lu"}, ValueError, "`method` must be one of"),
        ({"layer": "fc1", "p": 10, "ridge": -1.0}, ValueError, "`ridge` must be a finite"),
        ({"layer": "fc1", "p": 10, "data": None}, StatisticsError, "pass `data` or `stats`"),
        ({"layer": "fc1", "p": 10, "data": []}, StatisticsError, "data iterable was empty"),
    ],
)
def test_refusals_leave_model_untouched(kwargs: dict, error: type, message: str) -> None:
    model = LeNet300100()
    kwargs = {"data": [torch.randn(8, 1, 28, 28)], **kwargs}
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        eliminate_neurons(model, inplace=True, **kwargs)
    assert _same_state(model, state) and read_plan(model) == []


@pytest.mark.slow
def test_mnist_lenet300100_fc1_to_60_neurons(mnist_dir: Path) -> None:
    from lightning_neuronprune.testing.datasets import load_mnist

    torch.manual_seed(0)
    x, y = load_mnist(mnist_dir, "train")
    x_test, y_test = load_mnist(mnist_dir, "test")
    model = LeNet300100()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        for idx in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(x_test).argmax(1) == y_test).float().mean().item()

    reduced, _ = eliminate_neurons(model, "fc1", 60, list(x[:20000].split(1000)), method="svd_qr")
    base, after = accuracy(model), accuracy(reduced)
    assert base > 0.96
    assert base - after < 0.02, (base, after)
