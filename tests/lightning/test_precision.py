"""The callback under every ``Trainer(precision=...)``: its forward passes go through the precision
plugin and the strategy as the Trainer's own do; statistics stay float64, modules keep the dtype."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from lit_models import BlobsData, LitMLP, applied, blobs, tiny_trainer
from pytorch_lightning.plugins.precision import HalfPrecision
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_neuronprune.lightning.callback as callback_module
import lightning_neuronprune.search.streaming as streaming_module
from lightning_neuronprune import (
    NeuronEliminationCallback,
    StatisticsError,
    collect_statistics,
    eliminate_neurons,
)

DTYPES = {
    "32-true": torch.float32,
    "bf16-mixed": torch.float32,
    "bf16-true": torch.bfloat16,
    "64-true": torch.float64,
}


_trainer = functools.partial(tiny_trainer, max_epochs=3)


@pytest.mark.parametrize("precision", list(DTYPES))
def test_every_cpu_precision(
    tmp_path: Path, seed: int, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grams: list[torch.Tensor] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        stats = collect_statistics(*args, **kwargs)
        grams.extend(s.gram for s in stats.values())
        return stats

    monkeypatch.setattr(streaming_module, "collect_statistics", spy)  # a plan: streamed fits
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=[16, 10, 7], apply={"net.2": 7}, joint="greedy",
        max_degradation=0.05,
    )  # fmt: skip
    model = LitMLP()
    trainer = _trainer(tmp_path, callback, precision=precision)
    trainer.fit(model, datamodule=BlobsData())

    assert grams and all(g.dtype == torch.float64 for g in grams)
    assert callback.result.points["net.0"][0].accuracy > 0.8  # evaluation ran on converted batches
    (point,) = callback.result.joint_points  # the reduced model, measured the same way
    assert point.strategy == "streamed" and point.accuracy > 0.8
    assert applied(callback) == {"net.2": 7} and model.net[2].out_features == 7
    dtype = DTYPES[precision]
    assert {p.dtype for p in model.parameters()} == {dtype}
    (result,) = trainer.test(model, datamodule=BlobsData(), verbose=False)
    assert result["test_acc"] > 0.8


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_search_under_low_precision(
    tmp_path: Path, seed: int, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search path: every junction's statistics, the sweep and the joint search."""
    grams: list[torch.Tensor] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        stats = collect_statistics(*args, **kwargs)
        grams.extend(s.gram for s in stats.values())
        return stats

    monkeypatch.setattr(callback_module, "collect_statistics", spy)
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=[16, 10, 7], joint="greedy", max_degradation=0.05,
        confirm=None,
    )  # fmt: skip
    model = LitMLP()
    _trainer(tmp_path, callback, precision=precision).fit(model, datamodule=BlobsData())
    assert len(grams) == 2 and all(g.dtype == torch.float64 for g in grams)
    assert callback.result.points["net.0"][0].accuracy > 0.8
    assert callback.result.joint_points  # the joint search ran its passes the same way
    assert {p.dtype for p in model.parameters()} == {DTYPES[precision]}


def test_statistics_accumulate_float64_from_low_precision_activations(seed: int) -> None:
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).to(torch.bfloat16)
    data = [torch.randn(16, 6) for _ in range(3)]
    convert = HalfPrecision("bf16-true").convert_input
    with pytest.raises(
        RuntimeError, match="dtype"
    ):  # raw float32 batches fail without the conversion
        collect_statistics(model, ["2"], data)
    stats = collect_statistics(model, ["2"], data, transfer=convert)["2"]
    X = torch.cat([model[1](model[0](x.to(torch.bfloat16))) for x in data]).double()
    assert stats.gram.dtype == torch.float64 and stats.count == 48
    torch.testing.assert_close(stats.gram, X.T @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.total, X.sum(0), rtol=1e-12, atol=1e-12)


class _DictBlobs(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = blobs(n, seed).tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "label": self.y[i]}


class _DictLitMLP(LitMLP):
    """Batches are dicts with keys the package does not know; the module's own batch hook turns
    them into ``(x, y)``, as the Trainer applies it."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch["pixels"], batch["label"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_DictBlobs(256, 0), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_DictBlobs(128, 1), batch_size=64)


def test_batches_go_through_the_modules_transfer_hooks(tmp_path: Path, seed: int) -> None:
    model = _DictLitMLP()
    with pytest.raises(StatisticsError, match="pixels"):  # what a raw batch would give
        collect_statistics(model, ["net.2"], model.train_dataloader())
    callback = NeuronEliminationCallback(
        targets=["net.0"], ranks=[12], apply={"net.0": 12}, verbose=False
    )
    _trainer(tmp_path, callback, precision="bf16-true").fit(model)
    assert applied(callback) == {"net.0": 12} and model.net[0].weight.dtype == torch.bfloat16
    assert callback.result.points["net.0"][0].accuracy > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA device")
def test_16_mixed_on_cuda(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=[16, 10, 7], apply={"net.2": 7}, verbose=False
    )
    model = LitMLP()
    trainer = _trainer(tmp_path, callback, precision="16-mixed", accelerator="gpu", devices=1)
    trainer.fit(model, datamodule=BlobsData())
    assert applied(callback) == {"net.2": 7} and model.net[2].weight.dtype == torch.float32
    assert callback.result.points["net.0"][0].accuracy > 0.8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_functional_elimination_keeps_the_model_dtype(seed: int, dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU())
    model = nn.Sequential(*model, nn.Linear(8, 3)).to(dtype)
    data = [torch.randn(16, 6) for _ in range(3)]
    reduced, _ = eliminate_neurons(
        model, {"0": 4, "2": 5}, data=data, transfer=lambda x: x.to(dtype)
    )  # the second junction's statistics are re-collected on the reduced model
    assert {p.dtype for p in reduced.parameters()} == {dtype}
    assert reduced[0].out_features == 4 and reduced[2].out_features == 5
    assert reduced(data[0].to(dtype)).dtype == dtype
