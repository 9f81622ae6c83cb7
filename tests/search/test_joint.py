from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lit_models import BlobsData, LitMLP, applied, holds_statistics, tiny_trainer, val_accuracy
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import (
    EnergyModel,
    JunctionError,
    NeuronEliminationCallback,
    collect_statistics,
    eliminate_neurons,
    find_junction,
    load_reduced,
    read_plan,
)
from lightning_neuronprune.search.joint import JointSearch
from lightning_neuronprune.search.pareto import pareto_front


def _duplicate_rows(layer: nn.Linear, rank: int) -> None:
    """Make output rows rank.. positive multiples of rows 0..: relu(s z) = s relu(z)."""
    with torch.no_grad():
        for i in range(rank, layer.out_features):
            scale = 0.5 + i
            layer.weight[i] = scale * layer.weight[i % rank]
            layer.bias[i] = scale * layer.bias[i % rank]


def _redundant_chain(generator: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                w = torch.randn(m.weight.shape, generator=generator, dtype=torch.float64)
                m.weight.copy_(w)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=torch.float64))
    _duplicate_rows(model[0], 5)
    _duplicate_rows(model[2], 5)
    return model


def _data(generator: torch.Generator, n: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, 10, generator=generator, dtype=torch.float64)
    return [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb in x.split(128)]


@pytest.mark.parametrize("method", ["svd_qr", "qr", "output"])
def test_chain_with_lossless_redundancy_is_exact(generator: torch.Generator, method: str) -> None:
    model = _redundant_chain(generator)
    data = _data(generator)
    x = torch.cat([xb for xb, _ in data])
    reduced, records = eliminate_neurons(model, {"0": 5, "2": 5}, data=data, method=method)
    assert [r.p for r in records] == [5, 5]
    assert (reduced[0].out_features, reduced[2].in_features, reduced[2].out_features) == (5, 5, 5)
    y = model(x)
    assert ((reduced(x) - y).norm() / y.norm()).item() < 1e-5

    junctions = [find_junction(model, t) for t in ("0", "2")]
    stats = collect_statistics(model, [j.consumer for j in junctions], data)
    search = JointSearch(
        model, junctions, stats, data, _Agreement(model, x), EnergyModel(),
        x[:1], method=method,
    )  # fmt: skip
    point = search.evaluate({"0": 5, "2": 5})
    assert point.accuracy == pytest.approx(1.0)
    applied = copy.deepcopy(model)
    search.apply(applied, point)
    assert ((applied(x) - y).norm() / y.norm()).item() < 1e-5
    assert point.energy_ratio > 1.5


class _Agreement(Metric):
    """1 when the predictions equal the original model's outputs (up to round-off), else less."""

    full_state_update = False

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            self.reference = model(x)
        self.add_state("err", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0), dist_reduce_fx="sum")
        self.offset = 0

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        ref = self.reference[self.offset : self.offset + len(preds)]
        self.offset = (self.offset + len(preds)) % len(self.reference)
        self.err += ((preds - ref).norm() / ref.norm()).double()
        self.n += 1

    def compute(self) -> torch.Tensor:
        return 1.0 - self.err / self.n


_trainer = tiny_trainer


def test_callback_joint_search_applies_from_the_joint_front(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"],
        ranks=4,
        max_degradation=0.03,
        joint="greedy",
        confirm=None,  # the choice is measured on the whole validation set
    )
    model = LitMLP()
    _trainer(tmp_path, [callback]).fit(model, datamodule=BlobsData())
    assert callback.result.joint_points
    everything = callback.result.joint_points + [
        pt for pts in callback.result.points.values() for pt in pts if pt.p < pt.n
    ]
    within = [pt for pt in everything if pt.accuracy_drop <= 0.03]
    assert callback.result.decision.chosen.energy.total == min(pt.energy.total for pt in within)
    assert callback.result.decision.chosen in pareto_front(everything)
    assert val_accuracy(model) == pytest.approx(callback.result.decision.chosen.accuracy, abs=1e-6)
    report = json.loads(Path(callback.report_paths[0]).read_text())
    assert len(report["joint"]) == len(callback.result.joint_points) and report["joint_front"]


def test_unreachable_budget_warns_and_leaves_model_untouched(tmp_path: Path, seed: int) -> None:
    class FirstIsBest(MulticlassAccuracy):
        calls = 0

        def compute(self) -> torch.Tensor:
            FirstIsBest.calls += 1
            return torch.tensor(1.0 if FirstIsBest.calls == 1 else 0.5)

    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=8, metric=FirstIsBest(4), max_degradation=0.1,
        verbose=False,
    )  # fmt: skip
    model = LitMLP()

    class Snapshot(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.state = copy.deepcopy(pl_module.state_dict())

    snap = Snapshot()
    with pytest.warns(
        UserWarning, match="no configuration keeps the metric's degradation within 0.1"
    ):
        _trainer(tmp_path, [snap, callback]).fit(model, datamodule=BlobsData())
    assert callback.result.decision.chosen is None and applied(callback) == {}
    state = model.state_dict()
    assert state.keys() == snap.state.keys()
    assert all(torch.equal(state[k], snap.state[k]) for k in state)


def test_duplicate_targets_and_bad_joint_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="`strategy` must be one of"):
        NeuronEliminationCallback(joint="random")
    with pytest.raises(MisconfigurationException, match="`shares` must be non-negative"):
        NeuronEliminationCallback(joint={"strategy": "sequential", "shares": [-1.0]})
    callback = NeuronEliminationCallback(targets=["net.0", "net.2:in"], verbose=False)
    with pytest.raises(JunctionError, match="'net.0' and 'net.2:in' name the same junction"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(LitMLP(), datamodule=BlobsData())


def test_fine_tune_then_checkpoint_and_reload(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(targets=["net.0", "net.2"], ranks=4, max_degradation=0.05)
    model = LitMLP()
    _trainer(tmp_path, [callback]).fit(model, datamodule=BlobsData())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert applied(callback)
    before = val_accuracy(model)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [checkpoint], max_epochs=2, enable_checkpointing=True).fit(
        model, datamodule=BlobsData()
    )
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert val_accuracy(model) >= before - 0.02
    reloaded = load_reduced(LitMLP(), tmp_path / "ckpt" / "last.ckpt")
    dm = BlobsData()
    dm.setup()
    x = dm.val_set.tensors[0]
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    assert read_plan(reloaded) == read_plan(model)


def test_joint_report_lists_only_changed_layers(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=4, max_degradation=0.03, joint="greedy"
    )
    model = LitMLP()
    _trainer(tmp_path, [callback]).fit(model, datamodule=BlobsData())
    report = json.loads(Path(callback.report_paths[0]).read_text())
    sizes = {"net.0": 24, "net.2": 16}
    assert applied(callback) and all(p < sizes[k] for k, p in applied(callback).items())
    assert report["applied"] == applied(callback)
    assert model.net[0].out_features == applied(callback).get("net.0", 24)
    assert model.net[2].out_features == applied(callback).get("net.2", 16)


def test_callback_joint_points_carry_numbers_only(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=4, joint="sequential", verbose=False
    )
    _trainer(tmp_path, [callback]).fit(LitMLP(), datamodule=BlobsData())
    assert callback.result.joint_points
    assert not any(holds_statistics(pt) for pt in callback.result.joint_points)


def test_conv_chain_joint_search_is_exact_and_applies(generator: torch.Generator) -> None:
    """conv → ReLU → conv → ReLU → flatten → Linear; each conv's last 3 channels copy its first 3:
    keeping 5 of 8 and 3 of 6 is lossless, on the cached path and once applied."""
    from lightning_neuronprune.search.strategies import greedy, sequential

    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 16, 4),
    ).double()  # fmt: skip
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight[-3:] = conv.weight[:3]
            conv.bias[-3:] = conv.bias[:3]
    x = torch.randn(64, 2, 4, 4, generator=generator, dtype=torch.float64)
    data = [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb in x.split(32)]
    y = model(x)
    junctions = [find_junction(model, t) for t in ("0", "2")]
    assert [j.kind for j in junctions] == ["conv", "conv"]
    stats = collect_statistics(model, ["2", "5"], data, channels={"5": 6})
    search = JointSearch(
        model, junctions, stats, data, _Agreement(model, x), EnergyModel(), x[:1],
        train_data=data,
    )  # fmt: skip
    point = search.evaluate({"0": 5, "2": 3})
    assert point.accuracy == pytest.approx(1.0) and point.energy_ratio > 1.0
    applied = copy.deepcopy(model)
    search.apply(applied, point)
    assert (applied[2].in_channels, applied[2].out_channels, applied[5].in_features) == (5, 3, 48)
    assert ((applied(x) - y).norm() / y.norm()).item() < 1e-10
    points = sequential(search, 1e-9)
    assert any(pt.config == {"0": 5, "2": 3} for pt in points)
    points = greedy(search, 1e-9, compensate=True, slack=0.5)
    compensated = [pt for pt in points if pt.strategy == "greedy+compensated"]
    assert compensated
    for pt in compensated[:2]:  # a compensated conv point applies exactly as it was evaluated
        applied = copy.deepcopy(model)
        search.apply(applied, pt)
        metric = _Agreement(model, x)
        for xb in x.split(32):  # the evaluation batches
            metric.update(applied(xb), None)
        assert float(metric.compute()) == pytest.approx(pt.accuracy, abs=1e-9)
