from __future__ import annotations

import copy
import csv
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from lit_models import BlobsData, LitMLP, applied, results, tiny_trainer
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import (
    ConfirmSettings,
    EnergyModel,
    JunctionError,
    ModelIO,
    NeuronEliminationCallback,
    load_reduced,
    read_plan,
    save_reduced,
)

_trainer = tiny_trainer


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)


@pytest.fixture
def fitted(tmp_path: Path, seed: int) -> tuple[LitMLP, NeuronEliminationCallback, Path]:
    """One fit with a CSV logger, targets in both layers and the input features."""
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2", "net.0:in"],
        ranks="all",
        max_degradation=0.02,
        joint=None,
        confirm=None,  # the choice is measured on the whole validation set
    )
    model = LitMLP()
    logger = CSVLogger(tmp_path, name="csv")
    _trainer(tmp_path, callback, logger=logger).fit(model, datamodule=BlobsData())
    return model, callback, Path(logger.log_dir)


def test_logs_every_evaluated_p(fitted: tuple[LitMLP, NeuronEliminationCallback, Path]) -> None:
    _, callback, log_dir = fitted
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for layer, points in callback.result.points.items():
        steps = {int(r["step"]) for r in rows if r.get(f"neuron_elimination/{layer}/accuracy")}
        assert steps == {pt.p for pt in points}
    keys = set(rows[0])
    for name in (
        "accuracy", "accuracy_drop", "energy_total", "energy_mac", "energy_sram_weights",
        "energy_sram_activations", "energy_dram", "params", "memory_params_bits",
        "memory_total_bits", "energy_ratio", "memory_ratio",
    ):  # fmt: skip
        assert f"neuron_elimination/net.0/{name}" in keys
        assert f"neuron_elimination/baseline/{name}" in keys
    report = json.loads((log_dir / "neuron_elimination.json").read_text())
    assert len(report["points"]) == len(results(callback))
    assert report["chosen"]["p"] == callback.result.decision.chosen.p
    assert (log_dir / "neuron_elimination.csv").read_text().count("\n") == len(
        results(callback)
    ) + 1


def test_sweep_stops_at_threshold(fitted: tuple[LitMLP, NeuronEliminationCallback, Path]) -> None:
    _, callback, _ = fitted
    for points in callback.result.points.values():
        assert points[0].p == points[0].n and points[0].accuracy_drop == 0
        within = [pt.accuracy_drop <= 0.02 for pt in points]
        # Every point but possibly the last is within the threshold; the sweep stops right after
        # the first one beyond it (or runs to p = 1).
        assert all(within[:-1])
        assert not within[-1] or points[-1].p == 1
        ps = [pt.p for pt in points]
        assert ps == sorted(ps, reverse=True)


def test_apply_max_energy_saving(fitted: tuple[LitMLP, NeuronEliminationCallback, Path]) -> None:
    model, callback, _ = fitted
    chosen = callback.result.decision.chosen
    candidates = [r for r in results(callback) if r["accuracy_drop"] <= 0.02 and r["p"] < r["n"]]
    assert chosen.energy.total == min(r["energy_total"] for r in candidates)
    assert applied(callback) == {chosen.layer: chosen.p}
    (record,) = read_plan(model)
    assert record["p"] == chosen.p and tuple(record["kept"]) == chosen.kept
    # The applied model really scores what the sweep measured.
    x, y = _val()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(chosen.accuracy, abs=1e-6)


def _val() -> tuple[torch.Tensor, torch.Tensor]:
    dm = BlobsData()
    dm.setup()
    return dm.val_set.tensors


def test_apply_none_leaves_model_unchanged(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(targets=["net.0"], apply=None, verbose=False)
    model = LitMLP()
    trainer = _trainer(tmp_path, callback)
    trainer.fit(model, datamodule=BlobsData())
    assert results(callback) and callback.result.decision.chosen is None and applied(callback) == {}
    assert model.net[0].out_features == 24 and read_plan(model) == []


def test_apply_explicit_then_test_and_reload(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.4:in"],
        ranks=[20, 10, 5],
        apply={"net.2": 7},
        joint=None,
        verbose=False,
    )
    model = LitMLP()
    trainer = _trainer(tmp_path, callback)
    trainer.fit(model, datamodule=BlobsData())
    assert applied(callback) == {"net.2": 7}
    assert model.net[2].out_features == 7 and model.net[4].in_features == 7
    (result,) = trainer.test(model, datamodule=BlobsData(), verbose=False)
    assert result["test_acc"] > 0.8

    x, _ = _val()
    path = tmp_path / "reduced.pt"
    save_reduced(model, path)
    fresh = load_reduced(LitMLP(), path)
    assert fresh.net[2].out_features == 7
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    ckpt = tmp_path / "after.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)  # plain data only
    again = load_reduced(LitMLP(), ckpt)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_custom_metric_and_eval_dataloader(tmp_path: Path, seed: int) -> None:
    dm = BlobsData()
    dm.setup()
    x, y = dm.val_set.tensors
    loader = DataLoader(TensorDataset(x[:100], y[:100]), batch_size=50)
    callback = NeuronEliminationCallback(
        targets="auto", ranks=[0.5, 0.25], metric=MulticlassAccuracy(4, top_k=2),
        eval_dataloader=loader, apply=None, verbose=False,
    )  # fmt: skip
    _trainer(tmp_path, callback).fit(LitMLP(), datamodule=dm)
    assert set(callback.result.points) == {"net.0", "net.2"}
    assert {pt.p for pt in callback.result.points["net.0"]} <= {24, 12, 6}
    assert all(pt.accuracy >= 0.9 for pt in callback.result.points["net.0"][:1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": []}, "`targets` must be 'auto' or a non-empty list"),
        ({"targets": ["a", "a"]}, "`targets` has duplicates"),
        ({"ranks": 0}, "`ranks` as a step must be a positive integer, got 0"),
        ({"ranks": [1.5]}, "fractions must lie in \\(0, 1\\], got 1.5"),
        ({"ranks": "some"}, "`ranks` must be 'auto', 'all'"),
        ({"max_degradation": -0.1}, "`max_degradation` must be a non-negative number"),
        ({"max_degradation": "5 percent"}, "`max_degradation` as a string must be a percentage"),
        (
            {"fit": {"method": "lu"}},
            "`method` must be one of \\['svd_qr', 'qr', 'output'\\], got 'lu'",
        ),
        ({"fit": {"ridge": -1.0}}, "`ridge` must be a finite number >= 0, got -1.0"),
        ({"fit": {"rigde": 1.0}}, "`fit` has an unknown field"),
        ({"fit": "qr"}, "`fit` must be a FitOptions, a mapping of its fields or None, got 'qr'"),
        ({"metric": "accuracy"}, "`metric` must be a torchmetrics.Metric, got str"),
        ({"apply": "best"}, "`apply` must be one of \\['max_energy_saving'\\]"),
        ({"apply": {"fc1": 0}}, "`apply` as a mapping must be a non-empty"),
        ({"max_samples": 0}, "`max_samples` must be a positive integer or None, got 0"),
        ({"energy_model": 3}, "`energy_model` must be an EnergyModel, got int"),
        ({"verbose": "yes"}, "`verbose` must be a bool, got 'yes'"),
        ({"weights": "first"}, "`weights` must be one of \\['last', 'best'\\], got 'first'"),
        ({"data": {"probe_samples": 0}}, "`probe_samples` must be a positive integer, got 0"),
        ({"data": {"mask_fn": "attention_mask"}}, "`mask_fn` must be callable"),
        ({"confirm": {"fraction": 1.0}}, "`fraction` must be a fraction in \\[0, 1\\), got 1.0"),
        ({"confirm": {"margin": 0.5}}, "`margin` must not exceed the budget"),
        ({"joint": {"strategy": "sequential", "shares": [0, 0]}}, "`shares` must be non-negative"),
        ({"joint": {"order": ["net.0", "net.2"]}}, "apply to the 'sequential' strategy"),
        (
            {"joint": {"strategy": "sequential", "order": ["net.0", "net.0"]}},
            "`order` must be a non-empty list of distinct layer names",
        ),
    ],
)
def test_constructor_validates(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        NeuronEliminationCallback(**kwargs)


class NoVal(BlobsData):
    val_dataloader = None  # type: ignore[assignment]


class EmptyVal(BlobsData):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(0, 12), torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize(
    ("callback_kwargs", "data", "error", "message"),
    [
        ({"targets": ["net.9"]}, BlobsData, JunctionError, "no nn.Linear named 'net.9'"),
        ({"targets": ["net.4"]}, BlobsData, JunctionError, "could not find the consumer"),
        ({"targets": ["net.0"], "apply": {"net.0": 99}}, BlobsData, MisconfigurationException,
         "p=99 in 'net.0', which has only 24 features"),
        ({"targets": ["net.0"]}, NoVal, MisconfigurationException, "needs evaluation data"),
        ({"targets": ["net.0"]}, EmptyVal, MisconfigurationException, "dataloader is empty"),
        ({"targets": "auto", "joint": {"strategy": "sequential", "order": ["net.2", "net.9"]}},
         BlobsData,
         MisconfigurationException, "`joint_order` names \\['net.9'\\], which are not among"),
        ({"targets": "auto", "joint": {"strategy": "sequential", "shares": [1.0]}}, BlobsData,
         MisconfigurationException, "one share per target \\(2: \\['net.0', 'net.2'\\]\\)"),
    ],
)  # fmt: skip
def test_refusals_before_work_leave_model_untouched(
    tmp_path: Path, callback_kwargs: dict, data: type, error: type, message: str
) -> None:
    model = LitMLP()
    state = _state(model)
    callback = NeuronEliminationCallback(verbose=False, **callback_kwargs)
    trainer = _trainer(tmp_path, callback, max_epochs=1)
    with pytest.raises(error, match=message):
        trainer.fit(model, datamodule=data())
    if data is BlobsData:
        assert _same(model, state)  # refused in on_fit_start: not even trained
    assert read_plan(model) == [] and model.net[0].out_features == 24


class Boom(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise RuntimeError("boom")


def test_failed_fit_is_not_simplified(tmp_path: Path) -> None:
    callback = NeuronEliminationCallback(targets=["net.0"], verbose=False)
    model = LitMLP()
    trainer = _trainer(tmp_path, callback)
    trainer.callbacks.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=BlobsData())
    assert callback.result is None and model.net[0].out_features == 24


class FailingMetric(MulticlassAccuracy):
    calls = 0

    def compute(self) -> torch.Tensor:
        FailingMetric.calls += 1
        if FailingMetric.calls > 3:
            raise RuntimeError("metric failed mid-sweep")
        return super().compute()


def test_error_during_sweep_leaves_trained_model_as_it_was(tmp_path: Path, seed: int) -> None:
    FailingMetric.calls = 0
    callback = NeuronEliminationCallback(targets=["net.0"], metric=FailingMetric(4), verbose=False)
    model = LitMLP()

    class Snapshot(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.state = _state(pl_module)

    snap = Snapshot()
    trainer = _trainer(tmp_path, snap)
    trainer.callbacks.append(callback)
    with pytest.raises(RuntimeError, match="metric failed mid-sweep"):
        trainer.fit(model, datamodule=BlobsData())
    assert _same(model, snap.state)
    assert model.net[0].out_features == 24 and model.net[2].in_features == 24
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_lightning_cli_yaml(tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 2
  default_root_dir: {tmp_path}
  enable_progress_bar: false
  enable_checkpointing: false
  logger: false
  callbacks:
    - class_path: lightning_neuronprune.NeuronEliminationCallback
      init_args:
        targets: [net.0]
        ranks: [12, 6]
        max_degradation: 0.05
        fit: {{method: qr}}
        apply: {{net.0: 12}}
"""
    )
    cli = LightningCLI(
        LitMLP, BlobsData, args=["fit", "--config", str(config)], save_config_callback=None
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, NeuronEliminationCallback)]
    assert callback.settings.options.method == "qr" and callback.settings.ranks == [12, 6]
    assert applied(callback) == {"net.0": 12}
    assert cli.model.net[0].out_features == 12


def test_default_metric_restores_each_submodule_mode() -> None:
    model = LitMLP()
    model.train()
    model.net[1].eval()
    callback = NeuronEliminationCallback(targets=["net.0"], verbose=False)
    metric = callback._metric(model, torch.zeros(1, 12), ModelIO())
    assert isinstance(metric, MulticlassAccuracy)
    assert model.training and model.net[0].training and not model.net[1].training


def test_report_and_applied_agree_for_user_keys(tmp_path: Path, seed: int) -> None:
    """`apply` named by target ("net.4:in") is reported and applied under the canonical layer."""
    callback = NeuronEliminationCallback(
        targets=["net.4:in"], ranks=[10, 5], apply={"net.4:in": 7}, joint=None, verbose=False
    )
    model = LitMLP()
    _trainer(tmp_path, callback).fit(model, datamodule=BlobsData())
    report = json.loads(Path(callback.report_paths[0]).read_text())
    assert applied(callback) == {"net.2": 7}
    assert report["applied"] == applied(callback)
    assert callback.result.decision.plan == applied(callback)
    assert model.net[2].out_features == 7


class CrossEntropy(Metric):
    """The mean cross-entropy: lower is better."""

    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.total += torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def test_loss_metric_increase_is_the_degradation(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0"], ranks="all", metric=CrossEntropy(), max_degradation=0.05, joint=None,
        verbose=False,
    )  # fmt: skip
    model = LitMLP()
    _trainer(tmp_path, callback, max_epochs=2).fit(model, datamodule=BlobsData())
    points = callback.result.points["net.0"]
    base = points[0].accuracy
    assert all(pt.accuracy_drop == pytest.approx(pt.accuracy - base) for pt in points)
    assert points[-1].accuracy_drop > 0.05  # the sweep stopped on a loss increase
    assert (
        callback.result.decision.chosen is not None
        and callback.result.decision.chosen.accuracy - base <= 0.05
    )
    assert model.net[0].out_features == callback.result.decision.chosen.p


def test_hf_dict_batches_padding_and_auto_targets(tmp_path: Path, seed: int) -> None:
    pytest.importorskip("transformers")
    from lit_models import LitTinyBert, TokenData

    callback = NeuronEliminationCallback(
        targets="auto", ranks=[0.75, 0.5, 0.25], max_degradation=0.05
    )
    model, data = LitTinyBert(), TokenData()
    _trainer(tmp_path, callback, max_epochs=3).fit(model, datamodule=data)
    ffn = [f"bert.bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    # the FFN pairs through GELUActivation, and the pooler (dense → tanh → classifier); not
    # the attention projections, nor the layers before a residual sum and LayerNorm
    assert sorted(callback.result.points) == [*ffn, "bert.bert.pooler.dense"]
    assert callback.result.joint_points  # the joint search ran on the dict batches too
    assert applied(callback)
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        assert model(batch).logits.shape == (batch["input_ids"].shape[0], 2)
    for layer, p in applied(callback).items():
        assert model.get_submodule(layer).out_features == p


def test_explicit_target_consumer_pairs(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets={"net.0": "net.2"}, ranks=[0.5], apply=None, verbose=False
    )
    _trainer(tmp_path, callback, max_epochs=1).fit(LitMLP(), datamodule=BlobsData())
    assert set(callback.result.points) == {"net.0"}
    wrong = NeuronEliminationCallback(targets={"net.0": "net.4"}, verbose=False)
    with pytest.raises(JunctionError, match="not the given consumer 'net.4'"):
        _trainer(tmp_path, wrong, max_epochs=1).fit(LitMLP(), datamodule=BlobsData())
    with pytest.raises(MisconfigurationException, match="`targets` as a mapping"):
        NeuronEliminationCallback(targets={"net.0": ""})
    with pytest.raises(MisconfigurationException, match="`probe_samples` must be a positive"):
        NeuronEliminationCallback(data={"probe_samples": 0})
    with pytest.raises(MisconfigurationException, match="`max_degradation` must be a non-neg"):
        NeuronEliminationCallback(max_degradation=-0.01)


def test_every_rank_reduces_rank_zeros_junctions(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank probes its own first batch; the junctions used are the broadcast ones."""
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=[0.5], joint=None, apply=None, verbose=False
    )
    trainer = _trainer(tmp_path, callback, max_epochs=1)
    broadcast = trainer.strategy.broadcast
    sent: list[Any] = []

    def rank_zero_found_one(obj: Any, src: int = 0) -> Any:
        if isinstance(obj, list) and obj and all(hasattr(j, "consumer") for j in obj):
            sent.append([j.layer for j in obj])
            return obj[:1]  # what rank zero's probe found, if it differed from this rank's
        return broadcast(obj, src)

    monkeypatch.setattr(trainer.strategy, "broadcast", rank_zero_found_one)
    trainer.fit(LitMLP(), datamodule=BlobsData())
    assert sent == [["net.0", "net.2"]]
    assert set(callback.result.points) == {"net.0"}


def test_a_failed_second_fit_leaves_no_result_of_the_first(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(targets=["net.0"], ranks=[0.5], joint=None, confirm=None)
    _trainer(tmp_path, callback, max_epochs=1).fit(LitMLP(), datamodule=BlobsData())
    assert callback.result is not None and callback.result.points
    trainer = _trainer(tmp_path, callback, max_epochs=1)
    trainer.callbacks.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(LitMLP(), datamodule=BlobsData())
    assert callback.result is None and callback.report_paths == ()
    assert callback.reduced_checkpoint_path is None


def test_energy_example_and_decision_come_from_rank_zero(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks with dynamic padding see different first samples: the energy example (which steers
    the greedy path) and the decision are rank zero's on every rank."""
    callback = NeuronEliminationCallback(targets=["net.0"], ranks=[0.5], joint=None, confirm=None)
    trainer = _trainer(tmp_path, callback, max_epochs=1)
    broadcast = trainer.strategy.broadcast
    rank_zero_example = torch.full((1, 12), 7.0)
    kinds: list[str] = []

    def from_rank_zero(obj: Any, src: int = 0) -> Any:
        if isinstance(obj, torch.Tensor) and obj.shape == (1, 12):
            kinds.append("example")
            return rank_zero_example
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], dict):
            kinds.append("decision")
            return None, {}  # rank zero chose no point: the model is kept
        return broadcast(obj, src)

    seen: list[torch.Tensor] = []
    estimate = EnergyModel.estimate

    def spy(self: EnergyModel, model: torch.nn.Module, example: Any) -> Any:
        seen.append(example)
        return estimate(self, model, example)

    monkeypatch.setattr(trainer.strategy, "broadcast", from_rank_zero)
    monkeypatch.setattr(EnergyModel, "estimate", spy)
    model = LitMLP()
    trainer.fit(model, datamodule=BlobsData())
    assert kinds == ["example", "decision"]
    assert seen and all(torch.equal(x, rank_zero_example) for x in seen)
    assert callback.result is not None and not callback.result.applied
    assert model.net[0].out_features == 24  # rank zero's decision, not this rank's


def test_example_input_array_is_the_energy_example(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    estimate = EnergyModel.estimate

    def spy(self: EnergyModel, model: torch.nn.Module, example: Any) -> Any:
        seen.append(example)
        return estimate(self, model, example)

    monkeypatch.setattr(EnergyModel, "estimate", spy)
    model = LitMLP()
    model.example_input_array = torch.full((1, 12), 3.0)
    callback = NeuronEliminationCallback(targets=["net.0"], ranks=[0.5], joint=None, confirm=None)
    _trainer(tmp_path, callback, max_epochs=1).fit(model, datamodule=BlobsData())
    assert seen and all(torch.equal(x, model.example_input_array) for x in seen)


def test_defaults_are_quiet_and_confirm_with_a_bound() -> None:
    callback = NeuronEliminationCallback()
    assert callback.verbose is False
    assert callback.settings.confirm == ConfirmSettings(0.5, 0.0, 0.9, 100, 20, 0.25)
    assert (callback.settings.max_degradation, callback.settings.relative) == (0.02, False)
    assert callback.settings.options.method == "output"
    assert len(inspect.signature(NeuronEliminationCallback).parameters) - 1 <= 15  # **deprecated


def test_apply_plan_uses_streamed_fits_one_junction_at_a_time(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixed `{layer: p}` needs no search: no sweep, no joint search and no statistics of every
    junction at once; each junction's statistics are collected alone, on the network reduced
    upstream, and the plan reloads."""
    import lightning_neuronprune.lightning.callback as callback_module
    import lightning_neuronprune.search.streaming as streaming_module

    def no_search(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a fixed plan must not run the search")

    calls: list[list[str]] = []
    collect = streaming_module.collect_statistics

    def spy(model: torch.nn.Module, consumers: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(list(consumers))
        assert kwargs["stop_early"]
        return collect(model, consumers, *args, **kwargs)

    monkeypatch.setattr(callback_module, "ReductionSearch", no_search)
    monkeypatch.setattr(streaming_module, "collect_statistics", spy)
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.4:in"], apply={"net.0": 12, "net.4:in": 9}, verbose=False
    )
    model = LitMLP()
    logger = CSVLogger(tmp_path, name="csv")
    _trainer(tmp_path, callback, logger=logger).fit(model, datamodule=BlobsData())

    assert calls == [["net.2"], ["net.4"]]  # one junction at a time, in network order
    assert applied(callback) == {"net.0": 12, "net.2": 9}
    assert model.net[0].out_features == 12 and model.net[2].out_features == 9
    result = callback.result
    assert {layer: len(pts) for layer, pts in result.points.items()} == {"net.0": 1, "net.2": 1}
    (point,) = result.joint_points
    assert result.decision.chosen is point and point.strategy == "streamed"
    assert [r["producer"] for r in read_plan(model)] == ["net.0", "net.2"]
    x, y = _val()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(point.accuracy, abs=1e-6)  # measured on the applied model
    report = json.loads(Path(callback.report_paths[0]).read_text())
    assert report["applied"] == {"net.0": 12, "net.2": 9}
    path = tmp_path / "reduced.pt"
    save_reduced(model, path)
    torch.testing.assert_close(load_reduced(LitMLP(), path)(x), model(x), rtol=0, atol=0)
