"""Tiny LightningModules and data for callback tests (importable by DDP subprocesses)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neuronprune import ReducedCheckpointMixin


def blobs(n: int, seed: int, dim: int = 12, classes: int = 4) -> TensorDataset:
    """Gaussian blobs: learnable in a few epochs, with some redundant input directions."""
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(classes, dim, generator=g) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


class LitMLP(pl.LightningModule):
    def __init__(self, dim: int = 12, hidden: int = 24, classes: int = 4, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(),
            nn.Linear(16, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class BlobsData(pl.LightningDataModule):
    def __init__(self, n_train: int = 512, n_val: int = 256, batch_size: int = 64) -> None:
        super().__init__()
        self.n_train, self.n_val, self.batch_size = n_train, n_val, batch_size

    def setup(self, stage: str | None = None) -> None:
        self.train_set = blobs(self.n_train, seed=0)
        self.val_set = blobs(self.n_val, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class ReducibleLitMLP(ReducedCheckpointMixin, LitMLP):
    """``LitMLP`` with the one line that makes ``load_from_checkpoint`` take reduced checkpoints."""
