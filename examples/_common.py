"""What the MNIST examples share: where MNIST lies, and a snapshot of the trained weights."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytorch_lightning as pl
import torch


def default_data_dir() -> str:
    """``$NEURONPRUNE_MNIST_DIR`` if set, else ``../shared/data/mnist`` relative to the working
    directory, or, when that does not exist, relative to the repository root."""
    if os.environ.get("NEURONPRUNE_MNIST_DIR"):
        return os.environ["NEURONPRUNE_MNIST_DIR"]
    relative = Path("..", "shared", "data", "mnist")
    beside_repo = (Path(__file__).resolve().parents[1] / relative).resolve()
    return str(relative if relative.is_dir() or not beside_repo.is_dir() else beside_repo)


class KeepUnreduced(pl.Callback):
    """Snapshot the trained weights in ``on_train_end``, before the elimination callback runs."""

    def __init__(self) -> None:
        self.state_dict: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state_dict = copy.deepcopy(pl_module.state_dict())
