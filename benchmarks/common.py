"""Shared by the benchmark scripts: MNIST tensors and trained reference networks (cached)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_neuronprune.testing.datasets import MNISTDataModule, load_mnist
from lightning_neuronprune.testing.models import LitClassifier

#: Default MNIST directory: $NEURONPRUNE_MNIST_DIR, else ../shared/data/mnist from the repo root.
DEFAULT_MNIST = os.environ.get(
    "NEURONPRUNE_MNIST_DIR", str(Path(__file__).resolve().parents[1].parent / "shared/data/mnist")
)
CACHE = Path(__file__).resolve().parent / ".cache"

#: Training recipes: (epochs, learning rate). Adam with a cosine schedule, batch 128.
RECIPES = {"lenet300100": (12, 1e-3), "lenet5": (12, 1e-3)}


def mnist_tensors(data_dir: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (x, y), "test": (x, y)}``: all 60000 training and 10000 test images."""
    return {split: load_mnist(data_dir, split) for split in ("train", "test")}


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trained(
    arch: str,
    data_dir: str,
    *,
    epochs: int | None = None,
    limit_train: int | None = None,
    seed: int = 0,
    cache: bool = True,
) -> LitClassifier:
    """A ``LitClassifier`` trained on MNIST with the recipe above, cached under ``.cache/``.

    Training uses 55000 images (the last 5000 are the validation split of ``MNISTDataModule``).
    """
    default_epochs, lr = RECIPES[arch]
    epochs = default_epochs if epochs is None else epochs
    tag = f"{arch}-e{epochs}-n{limit_train or 'all'}-s{seed}"
    path = CACHE / f"{tag}.pt"
    model = LitClassifier(arch, lr=lr, epochs=epochs)
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    pl.seed_everything(seed, verbose=False)
    started = time.perf_counter()
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    dm = MNISTDataModule(data_dir, batch_size=128, limit_train=limit_train)
    trainer.fit(model, datamodule=dm)
    print(f"trained {tag} in {time.perf_counter() - started:.0f}s", flush=True)
    if cache:
        CACHE.mkdir(exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, in batches of 2000."""
    model.eval()
    correct = sum(
        int((model(xb).argmax(-1) == yb).sum())
        for xb, yb in zip(x.split(2000), y.split(2000), strict=True)
    )
    return correct / len(y)


if __name__ == "__main__":
    data = mnist_tensors(DEFAULT_MNIST)
    for arch in RECIPES:
        m = trained(arch, DEFAULT_MNIST)
        print(arch, "test accuracy", accuracy(m, *data["test"]))
