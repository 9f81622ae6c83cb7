"""Does the budget hold on MNIST's test set with the callback's defaults, and what does the
held-out bound cost in compression?

LeNet-300-100 is trained as ``examples/mnist_lenet.py`` trains it (5 epochs, Adam 1e-3, batch
128) on the first ``60000 - val_size`` training images; the last ``val_size`` are the validation
set the callback searches and confirms on. Then, for every confirmation setting below, one more
``Trainer.fit`` of a single batch at learning rate 0 (the weights do not change) runs the callback
exactly as after a real fit, with the README example's targets (``net.fc1:in``, ``net.fc1``,
``net.fc2``), budget (2 points) and every other argument at its default. The reduced model is then
scored on the 10000 test images, which the callback never sees.

Settings compared:

* ``default``: ``ConfirmSettings()``: half the validation set held out; the 90 % upper
  confidence bound of the held-out drop (Bonferroni-corrected over the candidates tried) must
  stay within three quarters of the budget (a reserve of 25 %);
* ``bound only``: ``ConfirmSettings(reserve=0.0)``, the bound within the whole budget;
* ``reserve only``: ``ConfirmSettings(confidence=None)``, the held-out drop itself within three
  quarters of the budget;
* ``plain``: ``ConfirmSettings(confidence=None, reserve=0.0)``, the held-out drop within the
  budget;
* ``no confirmation``: ``confirm=None``, the whole validation set for the search.

Examples::

    python benchmarks/budget_defaults.py                         # val 5000 and 6000, seed 0
    python benchmarks/budget_defaults.py --val-sizes 5000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_MNIST  # noqa: E402
from report import machine_description, md_table  # noqa: E402

from lightning_neuronprune import ConfirmSettings, NeuronEliminationCallback  # noqa: E402
from lightning_neuronprune.testing.datasets import MNISTDataModule  # noqa: E402
from lightning_neuronprune.testing.models import LitClassifier  # noqa: E402

TARGETS = ["net.fc1:in", "net.fc1", "net.fc2"]
BUDGET = 0.02
SETTINGS: dict[str, ConfirmSettings | None] = {
    "default": ConfirmSettings(),
    "bound only": ConfirmSettings(reserve=0.0),
    "reserve only": ConfirmSettings(confidence=None),
    "plain": ConfirmSettings(confidence=None, reserve=0.0),
    "no confirmation": None,
}


def _quiet_trainer(root: str, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
        deterministic="warn", **kwargs,
    )  # fmt: skip


def test_accuracy(model: LitClassifier, dm: MNISTDataModule, root: str) -> float:
    return _quiet_trainer(root, []).test(model, datamodule=dm, verbose=False)[0]["test_acc"]


def train(dm: MNISTDataModule, seed: int, epochs: int, root: str) -> dict[str, torch.Tensor]:
    pl.seed_everything(seed, workers=True)
    model = LitClassifier("lenet300100", lr=1e-3, epochs=epochs)
    _quiet_trainer(root, [], max_epochs=epochs).fit(model, datamodule=dm)
    return copy.deepcopy(model.state_dict())


def reduce_once(
    state: dict[str, torch.Tensor], dm: MNISTDataModule, confirm: ConfirmSettings | None, root: str
) -> tuple[LitClassifier, NeuronEliminationCallback, float]:
    model = LitClassifier("lenet300100", lr=0.0)
    model.load_state_dict(state)
    callback = NeuronEliminationCallback(targets=TARGETS, max_degradation=BUDGET, confirm=confirm)
    started = time.perf_counter()
    _quiet_trainer(root, [callback], max_epochs=1, limit_train_batches=1).fit(model, datamodule=dm)
    return model, callback, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_MNIST)
    parser.add_argument("--val-sizes", type=int, nargs="+", default=[5000, 6000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}, torch {torch.__version__}, threads {args.threads}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for val_size in args.val_sizes:
            dm = MNISTDataModule(args.data_dir, batch_size=128, val_size=val_size)
            for seed in args.seeds:
                state = train(dm, seed, args.epochs, root)
                unreduced = LitClassifier("lenet300100", lr=0.0)
                unreduced.load_state_dict(state)
                before = test_accuracy(unreduced, dm, root)
                for name in args.settings:
                    model, cb, seconds = reduce_once(state, dm, SETTINGS[name], root)
                    result = cb.result
                    assert result is not None  # the fit finished, so the callback ran
                    chosen = result.decision.chosen if result.applied else None
                    after = test_accuracy(model, dm, root)
                    drop = before - after
                    rows.append([
                        f"{60000 - val_size}/{val_size}", seed, name,
                        ", ".join(f"{k}={p}" for k, p in result.decision.plan.items()) or "—",
                        f"{chosen.energy_ratio:.2f}×" if chosen is not None else "1.00×",
                        f"{100 * chosen.accuracy_drop:.2f}" if chosen is not None else "0.00",
                        f"{100 * before:.2f}", f"{100 * drop:.2f}",
                        "yes" if drop <= BUDGET else "NO", f"{seconds:.0f}",
                    ])  # fmt: skip
                    print(" | ".join(map(str, rows[-1])), flush=True)
    header = [
        "train/val", "seed", "confirmation", "applied", "energy ×", "search drop (pt)",
        "test acc before (%)", "test drop (pt)", "within 2 pt", "callback s",
    ]  # fmt: skip
    print()
    print(md_table(header, rows))


if __name__ == "__main__":
    main()
