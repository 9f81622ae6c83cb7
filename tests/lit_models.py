"""Tiny LightningModules and data for callback tests (importable by DDP subprocesses)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import (
    EnergyModel,
    ReducedCheckpointMixin,
    collect_statistics,
    find_junction,
)
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.search.joint import JointPoint, JointSearch


def tiny_trainer(
    tmp_path: Path, callbacks: pl.Callback | list[pl.Callback], **overrides: Any
) -> pl.Trainer:
    """A quiet CPU Trainer for tests: 4 epochs, no progress bar, summary, checkpoints or logger,
    rooted in ``tmp_path``; ``overrides`` replace any of these."""
    options: dict[str, Any] = {
        "max_epochs": 4,
        "default_root_dir": tmp_path,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "callbacks": callbacks if isinstance(callbacks, list) else [callbacks],
    }
    options.update(overrides)
    return pl.Trainer(**options)


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


class TokenData(pl.LightningDataModule):
    """Hugging Face-style dict batches of padded token sequences: ``input_ids``,
    ``attention_mask`` and ``labels`` (whether token 1 occurs among the real tokens)."""

    def __init__(self, n: int = 192, length: int = 12, vocab: int = 30, batch_size: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, vocab, (n, length), generator=g)
        lengths = torch.randint(4, length + 1, (n,), generator=g)
        mask = (torch.arange(length) < lengths[:, None]).long()
        marked = torch.rand(n, generator=g) < 0.5
        ids[marked, 0] = 1
        ids[mask == 0] = 0
        self.rows = [
            {"input_ids": ids[i], "attention_mask": mask[i], "labels": marked[i].long()}
            for i in range(n)
        ]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows[:128], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.rows[128:], batch_size=self.batch_size)


class LitTinyBert(pl.LightningModule):
    """A randomly initialised 2-layer BERT classifier whose ``forward`` takes the whole batch."""

    def __init__(self, vocab: int = 30) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=2,
        )  # fmt: skip
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch).logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch).logits, batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def trained_joint_search(
    seed: int = 0, epochs: int = 4, method: str = "svd_qr"
) -> tuple[LitMLP, JointSearch, list]:
    """A LitMLP trained on blobs, and a JointSearch over its three junctions (grid step 3)."""
    pl.seed_everything(seed, verbose=False)
    model = LitMLP()
    dm = BlobsData()
    pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, datamodule=dm)  # fmt: skip
    junctions = [find_junction(model, t) for t in ("net.0:in", "net.0", "net.2")]
    stats = collect_statistics(model, [j.consumer for j in junctions], dm.train_dataloader())
    search = JointSearch(
        model, junctions, stats, dm.val_dataloader(), MulticlassAccuracy(4, average="micro"),
        EnergyModel(),
        dm.val_set.tensors[0][:1], train_data=dm.train_dataloader(), ranks=3, method=method,
    )  # fmt: skip
    return model, search, junctions


def val_accuracy(model: nn.Module) -> float:
    """Accuracy on BlobsData's validation set, by one full forward pass."""
    dm = BlobsData()
    dm.setup()
    x, y = dm.val_set.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def holds_statistics(point: JointPoint) -> bool:
    """Whether a result holds statistics or tensors anywhere in its fields."""
    stack: list[Any] = [getattr(point, f.name) for f in dataclasses.fields(point)]
    while stack:
        value = stack.pop()
        if isinstance(value, (torch.Tensor, JunctionStatistics)):
            return True
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return False


def applied(callback: Any) -> dict[str, int]:
    """``{layer: p}`` that the callback's last run applied (``{}`` when none)."""
    r = callback.result
    return dict(r.decision.plan) if r is not None and r.applied else {}


def results(callback: Any) -> list[dict[str, Any]]:
    """One dict per single-layer point of the callback's last run."""
    r = callback.result
    return [pt.as_dict() for pt in r.every] if r is not None else []
