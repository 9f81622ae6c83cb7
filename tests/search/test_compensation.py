"""Compensating re-fits against the plain Eq. 6 and the original network's outputs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lit_models import trained_joint_search, val_accuracy
from torch import nn

from lightning_neuronprune import collect_statistics, find_junction
from lightning_neuronprune.core.selection import output_order
from lightning_neuronprune.errors import StatisticsError
from lightning_neuronprune.search.compensation import (
    collect_cross_statistics,
    compensate_junction,
    compensated_order,
)
from lightning_neuronprune.search.elimination import reduce_junction
from lightning_neuronprune.search.strategies import greedy


def _chain(generator: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4)
    ).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=generator, dtype=torch.float64)
                )
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=torch.float64))
    return model


def _data(generator: torch.Generator, n: int = 600) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, 10, generator=generator, dtype=torch.float64)
    return [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb in x.split(200)]


def test_without_earlier_reduction_it_is_the_output_method(generator: torch.Generator) -> None:
    model = _chain(generator)
    data = _data(generator)
    j = find_junction(model, "0")
    cs = collect_cross_statistics(model, copy.deepcopy(model), j.consumer, data)
    stats = collect_statistics(model, [j.consumer], data)[j.consumer]
    torch.testing.assert_close(cs.cross, stats.gram)
    W = model.get_submodule(j.consumer).weight
    assert compensated_order(cs, W).tolist() == output_order(stats, W).tolist()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compensate_junction(a, j, cs, 6)
    reduce_junction(b, j, stats, 6, method="output")
    torch.testing.assert_close(a[2].weight, b[2].weight)
    torch.testing.assert_close(a[0].weight, b[0].weight)


def test_affine_without_earlier_reduction_it_is_the_affine_output_method(
    generator: torch.Generator,
) -> None:
    model = _chain(generator)
    data = _data(generator)
    j = find_junction(model, "0")
    cs = collect_cross_statistics(model, copy.deepcopy(model), j.consumer, data)
    stats = collect_statistics(model, [j.consumer], data)[j.consumer]
    torch.testing.assert_close(cs.original_total, stats.total)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compensate_junction(a, j, cs, 6, affine=True)
    reduce_junction(b, j, stats, 6, method="output", affine=True)
    torch.testing.assert_close(a[0].weight, b[0].weight)
    torch.testing.assert_close(a[2].weight, b[2].weight)
    torch.testing.assert_close(a[2].bias, b[2].bias)


def test_compensating_fit_beats_plain_refit_on_the_consumer_output(
    generator: torch.Generator,
) -> None:
    """Same kept sets; after a lossy first junction the compensating fit of the second junction
    reproduces the original network's logits better on the fitting data (least squares)."""
    model = _chain(generator)
    data = _data(generator)
    x = torch.cat([xb for xb, _ in data])
    j0, j1 = find_junction(model, "0"), find_junction(model, "2")
    first = copy.deepcopy(model)
    st0 = collect_statistics(model, [j0.consumer], data)[j0.consumer]
    reduce_junction(first, j0, st0, 5, method="output")  # lossy: 12 -> 5
    kept = torch.tensor([0, 2, 4, 6])
    plain, comp = copy.deepcopy(first), copy.deepcopy(first)
    st1 = collect_statistics(plain, [j1.consumer], data)[j1.consumer]
    reduce_junction(plain, j1, st1, 4, kept=kept)
    cs = collect_cross_statistics(model, comp, j1.consumer, data)
    compensate_junction(comp, j1, cs, 4, kept=kept)
    with torch.no_grad():
        y = model(x)
        err_plain = (plain(x) - y).norm()
        err_comp = (comp(x) - y).norm()
    assert err_comp < err_plain


def test_cross_statistics_refuse_mismatched_consumers(generator: torch.Generator) -> None:
    model = _chain(generator)
    other = copy.deepcopy(model)
    other[2] = nn.Linear(5, 9).double()
    with pytest.raises(StatisticsError, match="reading the same features in both"):
        collect_cross_statistics(model, other, "2", _data(generator))


@pytest.mark.parametrize("method", ["output", "svd_qr"])
def test_greedy_compensated_points_apply_exactly(seed: int, method: str) -> None:
    model, search, junctions = trained_joint_search(seed, epochs=3, method=method)
    points = greedy(search, 0.02, compensate=True, slack=0.05)
    compensated = [pt for pt in points if pt.strategy == "greedy+compensated"]
    assert compensated and all(search._fitted[id(pt)][2] for pt in compensated)
    for pt in compensated[:2]:
        applied = copy.deepcopy(model)
        search.apply(applied, pt)
        assert val_accuracy(applied.eval()) == pytest.approx(pt.accuracy, abs=1e-6)
        if method != "output":
            assert pt.kept == search.evaluate(pt.config).kept
    with pytest.raises(ValueError, match="`slack` must be non-negative"):
        greedy(search, 0.02, compensate=True, slack=-1)


def test_cross_statistics_read_the_host_once_not_per_batch(
    generator: torch.Generator, host_reads
) -> None:
    """The finiteness check is accumulated on the device and read after the loop: the host
    reads do not grow with the number of batches, the moments equal a direct computation, and
    a NaN anywhere still raises the same error."""
    model = _chain(generator)
    reduced = copy.deepcopy(model)
    with torch.no_grad():
        reduced[0].weight.mul_(0.5)
    reads = []
    for batches in (2, 6):
        data = _data(generator, n=200 * batches)
        x = torch.cat([xb for xb, _ in data])
        before = host_reads.count
        cs = collect_cross_statistics(model, reduced, "2", data)
        reads.append(host_reads.count - before)
        with torch.no_grad():
            X, Xr = torch.relu(model[0](x)), torch.relu(reduced[0](x))
        torch.testing.assert_close(cs.cross, X.T @ Xr)
        torch.testing.assert_close(cs.reduced.gram, Xr.T @ Xr)
        torch.testing.assert_close(cs.reduced.total, Xr.sum(0))
        assert cs.reduced.count == len(x)
    assert reads[0] == reads[1]
    data = _data(generator)
    data[1][0][3, 2] = float("nan")  # one value of the middle batch
    with pytest.raises(StatisticsError, match=r"non-finite activations .*at the input of '2'"):
        collect_cross_statistics(model, reduced, "2", data)


def _joint_search_without_consumer_bias(
    generator: torch.Generator, *, affine: bool
) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    """A JointSearch over the two junctions of a chain whose consumers have no bias; the labels
    are the chain's own predictions on noisy inputs."""
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_neuronprune import EnergyModel
    from lightning_neuronprune.search.joint import JointSearch

    model = _chain(generator)
    model[2].bias = None
    model[4].bias = None
    x = torch.randn(600, 10, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        noise = torch.randn(600, 4, generator=generator, dtype=torch.float64)
        y = (model(x) + 2.0 * noise).argmax(1)
    data = list(zip(x.split(200), y.split(200), strict=True))
    junctions = [find_junction(model, t) for t in ("0", "2")]
    stats = collect_statistics(model, [j.consumer for j in junctions], data)
    search = JointSearch(
        model, junctions, stats, data, MulticlassAccuracy(4, average="micro"), EnergyModel(),
        x[:1], train_data=data, ranks=3, method="svd_qr", affine=affine,
    )  # fmt: skip
    return model, search, x, y


@pytest.mark.parametrize("affine", [True, False])
def test_compensated_point_without_consumer_bias_applies_as_evaluated(
    generator: torch.Generator, affine: bool
) -> None:
    """Regression: with ``affine=True`` and consumers without bias, the applied model kept the
    intercept of the plain affine fit that the evaluated (compensated) model never had."""
    model, search, x, y = _joint_search_without_consumer_bias(generator, affine=affine)
    points = greedy(search, 1.0, refit=False, compensate=True)
    compensated = [pt for pt in points if pt.strategy == "greedy+compensated"]
    assert compensated
    for pt in compensated:
        applied = copy.deepcopy(model)
        search.apply(applied, pt)
        with torch.no_grad():
            acc = (applied.eval()(x).argmax(1) == y).double().mean().item()
        assert acc == pytest.approx(pt.accuracy, abs=1e-6)
        consumers = [search.by_layer[layer].consumer for layer in pt.kept]
        assert all((applied.get_submodule(c).bias is not None) == affine for c in consumers)


class _TokenMLP(nn.Module):
    """A per-token MLP on ``batch["tokens"]`` (B, T, 6), mean-pooled over the real tokens."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.net = _chain(generator)
        self.net[0] = nn.Linear(6, 12).double()
        with torch.no_grad():
            self.net[0].weight.copy_(torch.randn(12, 6, generator=generator, dtype=torch.float64))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.net(batch["tokens"])
        m = batch["attention_mask"].unsqueeze(-1).to(h)
        return (h * m).sum(1) / m.sum(1)


def _token_batches(generator: torch.Generator, n: int = 240) -> list[dict[str, torch.Tensor]]:
    """Float32 dict batches of padded sequences; the padding holds large values (1e3)."""
    tokens = torch.randn(n, 7, 6, generator=generator)
    lengths = torch.randint(2, 8, (n,), generator=generator)
    mask = (torch.arange(7) < lengths[:, None]).long()
    tokens[mask == 0] = 1e3
    labels = torch.randint(0, 4, (n,), generator=generator)
    return [
        {"tokens": t, "attention_mask": m, "labels": y}
        for t, m, y in zip(tokens.split(80), mask.split(80), labels.split(80), strict=True)
    ]


def _to_double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``transfer`` that converts floating inputs to the model's float64 (as ``64-true``)."""
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def test_cross_statistics_take_the_batch_adapters_and_skip_padding(
    generator: torch.Generator,
) -> None:
    """Regression: the cross statistics took no ``transfer``, ``forward_context`` nor ``mask_fn``,
    called ``model(x)`` and counted padding. Reference: the consumer inputs of the real tokens,
    computed by hand."""
    model = _TokenMLP(generator)
    reduced = copy.deepcopy(model)
    with torch.no_grad():
        reduced.net[0].weight.add_(0.1 * torch.randn(12, 6, generator=generator).double())
    data = _token_batches(generator)
    entered = []

    def context() -> Any:
        entered.append(1)
        return torch.no_grad()

    cs = collect_cross_statistics(
        model, reduced, "net.2", data, input_fn=lambda b: b, transfer=_to_double,
        forward_context=context,
    )  # fmt: skip
    tokens = torch.cat([b["tokens"] for b in data]).double()
    real = torch.cat([b["attention_mask"] for b in data]).bool()
    with torch.no_grad():
        X = model.net[:2](tokens[real])
        Xr = reduced.net[:2](tokens[real])
    assert cs.reduced.count == int(real.sum()) < real.numel()
    torch.testing.assert_close(cs.reduced.gram, Xr.T @ Xr)
    torch.testing.assert_close(cs.cross, X.T @ Xr)
    torch.testing.assert_close(cs.original_total, X.sum(0))
    torch.testing.assert_close(cs.reduced.total, Xr.sum(0))
    assert len(entered) == 2 * len(data)  # each network's forward pass, every batch
    everything = collect_cross_statistics(
        model, reduced, "net.2", data, input_fn=lambda b: b, transfer=_to_double,
        mask_fn=lambda b: None,
    )  # fmt: skip
    assert everything.reduced.count == real.numel()


def test_joint_compensate_runs_on_dict_batches_with_padding(generator: torch.Generator) -> None:
    """Regression: ``joint_compensate=True`` raised StatisticsError on dict batches (no
    ``input_fn`` reached the cross statistics). The compensated points are fitted on real tokens
    and apply exactly as evaluated."""
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_neuronprune import EnergyModel
    from lightning_neuronprune.search.pipeline import ModelIO, ReductionSearch
    from lightning_neuronprune.search.settings import JointSettings, SearchSettings

    model = _TokenMLP(generator)
    data = _token_batches(generator)
    with torch.no_grad():  # labels the model gets mostly right
        for b in data:
            noise = torch.randn(len(b["labels"]), 4, generator=generator).double()
            b["labels"] = (model(_to_double(b)) + noise).argmax(1)
    io = {"input_fn": lambda b: b, "target_fn": lambda b: b["labels"], "transfer": _to_double}
    junctions = [find_junction(model, t) for t in ("net.0", "net.2")]
    stats = collect_statistics(
        model, [j.consumer for j in junctions], data, input_fn=io["input_fn"],
        transfer=_to_double,
    )  # fmt: skip
    settings = SearchSettings(ranks=3, max_degradation=0.05, joint=JointSettings(compensate=True))
    search = ReductionSearch(model, junctions, stats, EnergyModel(), settings, ModelIO(**io))
    metric = MulticlassAccuracy(4, average="micro")
    result = search.run(data, metric, _to_double(data[0]), train_data=data)
    compensated = [pt for pt in result.joint_points if pt.strategy == "greedy+compensated"]
    assert compensated
    joint = search._joint
    assert joint is not None
    for pt in compensated:
        applied = copy.deepcopy(model)
        joint.apply(applied, pt)
        with torch.no_grad():
            predictions = torch.cat([applied.eval()(_to_double(b)).argmax(1) for b in data])
        labels = torch.cat([b["labels"] for b in data])
        assert (predictions == labels).double().mean().item() == pytest.approx(pt.accuracy, 1e-6)


@pytest.mark.parametrize("target", ["0", "2"])
def test_conv_junctions_compensate_like_the_output_method(
    generator: torch.Generator, target: str
) -> None:
    """Without an earlier reduction the compensating fit of a conv junction (conv → conv, or
    conv → flatten → Linear) is the per-tap refit with output-aware selection."""
    from lightning_neuronprune.structure.conv import statistics_channels

    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 16, 4),
    ).double()  # fmt: skip
    x = torch.randn(32, 2, 4, 4, generator=generator, dtype=torch.float64)
    data = [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb in x.split(16)]
    j = find_junction(model, target)
    channels = statistics_channels(model, [j]).get(j.consumer)
    cs = collect_cross_statistics(model, copy.deepcopy(model), j.consumer, data, channels=channels)
    stats = collect_statistics(model, [j.consumer], data, channels=statistics_channels(model, [j]))
    torch.testing.assert_close(cs.cross, stats[j.consumer].gram)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    kept = compensate_junction(a, j, cs, 4)
    rec = reduce_junction(b, j, stats[j.consumer], 4, method="output")
    assert kept.tolist() == list(rec.kept)
    cons = j.consumer
    torch.testing.assert_close(a.get_submodule(cons).weight, b.get_submodule(cons).weight)
    torch.testing.assert_close(a(x), b(x))
