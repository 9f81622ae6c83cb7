"""The callback reduces the channels of a small CNN trained in a Trainer; the reduced
checkpoint reloads into a fresh module with identical outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from lit_models import applied, tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neuronprune import NeuronEliminationCallback, load_reduced, read_plan
from lightning_neuronprune.structure.targets import resolve_targets


def _images(n: int, seed: int, classes: int = 4) -> TensorDataset:
    """8×8 images: one bright quadrant per class, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(classes):
        r, q = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 1.0
    return TensorDataset(x, y)


class _Images(pl.LightningDataModule):
    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = _images(384, 0), _images(256, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


class LitCNN(pl.LightningModule):
    """conv → BN → ReLU → pool → conv → flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 4 * 4, 4),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.02)


def test_auto_targets_include_the_conv_junctions() -> None:
    targets = resolve_targets(LitCNN())
    assert [(j.layer, j.kind, j.consumer) for j in targets] == [
        ("net.0", "conv", "net.4"),
        ("net.4", "conv", "net.6"),
    ]


@pytest.mark.parametrize("apply", [{"net.0": 5, "net.4": 3}, "max_energy_saving"])
def test_callback_reduces_conv_channels_and_the_checkpoint_reloads(
    tmp_path: Path, seed: int, apply: Any
) -> None:
    callback = NeuronEliminationCallback(
        targets="auto", apply=apply, max_degradation=0.05, joint=None, confirm=None,
        verbose=False,
    )  # fmt: skip
    model = LitCNN()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = tiny_trainer(
        tmp_path, [checkpoint, callback], max_epochs=1, enable_checkpointing=True
    )
    trainer.fit(model, datamodule=_Images())
    result = callback.result
    assert set(result.points) == {"net.0", "net.4"}
    plan = applied(callback)
    assert result.applied and plan
    if isinstance(apply, dict):
        assert plan == apply
    conv1, conv2, fc = model.net[0], model.net[4], model.net[6]
    assert (conv1.out_channels, model.net[1].num_features) == (plan.get("net.0", 8),) * 2
    assert (conv2.in_channels, conv2.out_channels) == (conv1.out_channels, plan.get("net.4", 6))
    assert fc.in_features == conv2.out_channels * 16
    assert {r["kind"] for r in read_plan(model)} == {"conv"}

    path = callback.reduced_checkpoint_path
    assert path is not None and Path(path).is_file()
    fresh = load_reduced(LitCNN(), path).eval()
    x = _images(32, 2).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.eval()(x), rtol=0, atol=0)
