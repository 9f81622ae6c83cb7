"""Held-out confirmation of the budget: the split, the walk down the front, the callback."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from lit_models import BlobsData, LitMLP, tiny_trainer
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_neuronprune import ConfirmSettings, FitOptions, NeuronEliminationCallback
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search.confirmation import (
    _uniform,
    chunk_batches,
    confirm_front,
    front_within,
    metric_drop,
    paired_stderr,
    split_batches,
)


def _loader(n: int, batch_size: int) -> DataLoader:
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    return DataLoader(TensorDataset(x, torch.arange(n)), batch_size=batch_size)


def _ids(batches: list) -> list[int]:
    return [int(i) for b in batches for i in b[1]]


def test_split_is_deterministic_and_independent_of_batching() -> None:
    search, confirm = split_batches(_loader(1000, 64), 0.5)
    s2, c2 = split_batches(_loader(1000, 7), 0.5)
    assert _ids(search) == _ids(s2) and _ids(confirm) == _ids(c2)
    assert sorted(_ids(search) + _ids(confirm)) == list(range(1000))
    assert set(_ids(search)).isdisjoint(_ids(confirm))
    # The rule is the documented hash of the position.
    assert _ids(confirm) == [i for i in range(1000) if _uniform(i, 1)[0] < 0.5]
    assert 450 < len(_ids(confirm)) < 550
    # Both features and targets are sliced consistently.
    for b in confirm:
        assert torch.equal(b[0][:, 0].long(), b[1])


def test_split_fraction_and_structures() -> None:
    _, confirm = split_batches(_loader(4000, 500), 0.2)
    assert 700 < len(_ids(confirm)) < 900
    batch = {"x": torch.randn(10, 2), "y": torch.arange(10), "name": "b", "scale": torch.tensor(2)}
    search, confirm = split_batches([batch], 0.5)
    got = confirm[0]
    assert got["name"] == "b" and torch.equal(got["scale"], torch.tensor(2))
    assert got["x"].shape[0] == got["y"].shape[0] == len(confirm[0]["y"])
    assert len(search[0]["y"]) + len(got["y"]) == 10


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True, "half"])
def test_split_rejects_bad_fraction(fraction) -> None:
    with pytest.raises(ValueError, match="`fraction` must lie in"):
        split_batches(_loader(10, 5), fraction)


def test_split_refuses_unsplittable_data() -> None:
    with pytest.raises(NeuronEliminationError, match="too small to split"):
        split_batches(_loader(1, 1), 0.5)
    with pytest.raises(NeuronEliminationError, match="holds no tensor"):
        split_batches([("a", "b")], 0.5)


def _pt(drop: float, energy: float) -> SimpleNamespace:
    return SimpleNamespace(
        accuracy_drop=drop, accuracy=1 - drop, energy=SimpleNamespace(total=energy),
        energy_ratio=1 / energy, memory_ratio=1 / energy, label=f"e={energy}",
    )  # fmt: skip


def test_front_within_budget_by_increasing_energy() -> None:
    pts = [_pt(0.03, 1.0), _pt(0.019, 2.0), _pt(0.015, 3.0), _pt(0.018, 4.0), _pt(0.001, 5.0)]
    assert [p.energy.total for p in front_within(pts, 0.02)] == [2.0, 3.0, 5.0]
    # Ties in drop stay (the search part could not tell them apart); one point per energy.
    pts = [_pt(0.0, 1.0), _pt(0.0, 2.0), _pt(0.0, 2.0), _pt(0.0, 3.0)]
    assert [p.energy.total for p in front_within(pts, 0.02)] == [1.0, 2.0, 3.0]


def test_confirm_front_walks_down_until_one_holds() -> None:
    front = [_pt(0.019, 1.0), _pt(0.015, 2.0), _pt(0.010, 3.0)]
    held_out = {1.0: 0.95, 2.0: 0.975, 3.0: 0.99}  # metric on the held-out part
    chosen, tried = confirm_front(front, lambda p: held_out[p.energy.total], 0.99, 0.02)
    assert chosen is front[1]
    assert [t.held for t in tried] == [False, True]
    assert tried[0].confirmed_drop == pytest.approx(0.04)
    assert tried[0].search_drop == pytest.approx(0.019)
    assert tried[1].as_dict()["confirmed_drop"] == pytest.approx(0.015)
    # A margin asks for more: only the last one holds.
    chosen, tried = confirm_front(
        front, lambda p: held_out[p.energy.total], 0.99, 0.02, margin=0.01
    )
    assert chosen is front[2] and len(tried) == 3
    chosen, tried = confirm_front(front[:1], lambda p: 0.5, 0.99, 0.02)
    assert chosen is None and [t.held for t in tried] == [False]
    with pytest.raises(ValueError, match="`margin` must be a non-negative"):
        confirm_front(front, lambda p: 1.0, 1.0, 0.02, margin=-1)


def test_metric_direction_is_respected() -> None:
    assert metric_drop(0.9, 0.85) == pytest.approx(0.05)
    assert metric_drop(0.10, 0.12, higher_is_better=False) == pytest.approx(0.02)
    front = [_pt(0.01, 1.0), _pt(0.005, 2.0)]
    losses = {1.0: 0.30, 2.0: 0.21}  # a loss: the first candidate raises it by 0.10
    chosen, tried = confirm_front(
        front, lambda p: losses[p.energy.total], 0.20, 0.02, higher_is_better=False
    )
    assert chosen is front[1]
    assert [round(t.confirmed_drop, 6) for t in tried] == [0.1, 0.01]


class _HardHeldOut(BlobsData):
    """Validation data whose held-out samples (by the documented hash) are much noisier blobs:
    the search part looks easy, the confirmation part is where reductions show."""

    noise = 2.0

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        x, y = self.val_set.tensors
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        mask = torch.from_numpy(_uniform(0, self.n_val) < 0.5)
        x = torch.where(mask[:, None], x + self.noise * noise, x)
        self.val_set = TensorDataset(x, y)


def test_callback_rejects_a_choice_that_fails_confirmation(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks="all", max_degradation=0.01, joint="greedy",
        fit=FitOptions(method="svd_qr"), confirm=ConfirmSettings(confidence=None, reserve=0.0),
    )  # fmt: skip
    model = LitMLP()
    data = _HardHeldOut(n_val=512)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = tiny_trainer(tmp_path, callback, logger=logger)
    snapshot: dict[str, torch.Tensor] = {}

    class Keep(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            snapshot.update(copy.deepcopy(pl_module.state_dict()))

    trainer.callbacks.insert(0, Keep())
    trainer.fit(model, datamodule=data)
    tried = callback.result.confirmations
    assert tried, "the held-out confirmation did not run"
    assert not tried[0].held, "the test needs a search choice that fails on held-out data"
    assert [t.held for t in tried[:-1]] == [False] * (len(tried) - 1)
    assert tried[-1].held and callback.result.decision.chosen is tried[-1].point
    assert all(t.search_drop <= 0.01 for t in tried)
    # The applied model is the confirmed one, and its held-out drop is what was recorded.
    _, held_out = split_batches(data.val_dataloader(), 0.5)
    unreduced = LitMLP()
    unreduced.load_state_dict(snapshot)

    def acc(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            right = sum(int((m(x).argmax(1) == y).sum()) for x, y in held_out)
        return right / sum(len(y) for _, y in held_out)

    assert acc(unreduced) - acc(model) == pytest.approx(tried[-1].confirmed_drop, abs=1e-6)
    assert acc(unreduced) - acc(model) <= 0.01
    doc = json.loads(Path(callback.report_paths[0]).read_text())
    assert [c["held"] for c in doc["confirmation"]] == [t.held for t in tried]
    assert doc["confirm_fraction"] == 0.5
    with open(callback.report_paths[-1]) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["confirmed_drop"]) for r in rows] == pytest.approx(
        [t.confirmed_drop for t in tried]
    )
    assert [float(r["search_drop"]) for r in rows] == pytest.approx([t.search_drop for t in tried])
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("neuron_elimination/confirmation/held")]
    assert [float(r["neuron_elimination/confirmation/confirmed_drop"]) for r in logged] == (
        pytest.approx([t.confirmed_drop for t in tried])
    )


def test_callback_without_confirmation_uses_all_eval_data(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(targets=["net.0"], ranks="all", joint=None, confirm=None)
    trainer = tiny_trainer(tmp_path, callback, max_epochs=2)
    trainer.fit(LitMLP(), datamodule=BlobsData())
    assert callback.result.confirmations == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"confirm": {"fraction": 1.0}}, "`fraction` must be a fraction in"),
        ({"confirm": {"fraction": "half"}}, "`fraction` must be a fraction in"),
        ({"confirm": {"margin": -0.01}}, "`margin` must be a non-negative number"),
        ({"confirm": {"margin": 0.5}}, "`margin` must not exceed the budget"),
        ({"confirm": {"confidence": 1.0}}, "`confidence` must be None or a level"),
        ({"confirm": {"chunk": 0}}, "`chunk` must be a positive integer"),
        ({"confirm": {"max_tries": True}}, "`max_tries` must be a positive integer"),
        ({"confirm": 0.5}, "`confirm` must be a ConfirmSettings, a mapping of its fields"),
    ],
)
def test_confirmation_arguments_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        NeuronEliminationCallback(**kwargs)


def test_chunk_batches_keeps_every_sample_in_order() -> None:
    batches = list(_loader(530, 64))
    chunks = chunk_batches(batches, 100)
    assert [sum(len(b[1]) for b in c) for c in chunks] == [100, 100, 100, 100, 130]
    assert [int(i) for c in chunks for b in c for i in b[1]] == list(range(530))
    with pytest.raises(ValueError, match="`size` must be a positive integer"):
        chunk_batches(batches, 0)


def test_paired_stderr_against_the_formula() -> None:
    base = [0.9, 0.8, 1.0, 0.9]
    red = [0.8, 0.8, 0.9, 0.6]
    drops = [0.1, 0.0, 0.1, 0.3]
    mean = sum(drops) / 4
    sd = (sum((d - mean) ** 2 for d in drops) / 3) ** 0.5
    assert paired_stderr(base, red) == pytest.approx(sd / 2)
    # Lower is better: the drop is value - baseline.
    assert paired_stderr(red, base, higher_is_better=False) == pytest.approx(sd / 2)
    assert paired_stderr([1.0], [0.5]) == 0.0
    with pytest.raises(ValueError, match="differ in number"):
        paired_stderr([1.0], [0.5, 0.4])


def test_confidence_bound_rejects_a_noisy_pass() -> None:
    """Held-out drop 1.5 points, within a 2-point budget, but with a standard error of 0.5 the
    Bonferroni bound over two candidates (z ≈ 1.96 at 95 %) is over it."""
    front = [_pt(0.019, 1.0), _pt(0.005, 2.0)]
    base_chunks = [1.0, 1.0, 1.0, 1.0]
    measured = {
        1.0: (0.985, [0.995, 0.975, 0.995, 0.975]),  # drops 0.5, 2.5, 0.5, 2.5 points
        2.0: (0.995, [0.995, 0.995, 0.995, 0.995]),
    }
    chosen, tried = confirm_front(
        front, lambda p: measured[p.energy.total], (1.0, base_chunks), 0.02, confidence=0.95
    )
    assert chosen is front[1]
    first = tried[0]
    assert first.confirmed_drop == pytest.approx(0.015) and not first.held
    se = paired_stderr(base_chunks, measured[1.0][1])
    assert first.upper_bound == pytest.approx(0.015 + 1.959964 * se, rel=1e-5)
    assert tried[1].held and tried[1].upper_bound == pytest.approx(0.005)
    # Without the bound the first one passes.
    chosen, _ = confirm_front(front, lambda p: measured[p.energy.total][0], 1.0, 0.02)
    assert chosen is front[0]
    with pytest.raises(ValueError, match="`confidence` must lie in"):
        confirm_front(front, lambda p: (1.0, [1.0]), (1.0, [1.0]), 0.02, confidence=1.5)


def test_callback_confidence_bound_is_reported(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0"], ranks="all", joint=None,
        confirm=ConfirmSettings(confidence=0.9, chunk=32),
    )  # fmt: skip
    trainer = tiny_trainer(tmp_path, callback, max_epochs=2)
    trainer.fit(LitMLP(), datamodule=BlobsData())
    assert callback.result.confirmations
    for c in callback.result.confirmations:
        assert c.upper_bound is not None and c.upper_bound >= c.confirmed_drop - 1e-12
        assert c.held == (c.upper_bound <= 0.02)
