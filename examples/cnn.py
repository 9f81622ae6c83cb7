"""Train LeNet-5 on MNIST, then remove redundant conv channels and FC neurons without retraining.

With ``targets="auto"`` the :class:`~lightning_neuronprune.NeuronEliminationCallback` finds every
junction of the network by tracing: the output channels of ``conv1`` (read by ``conv2``), of
``conv2`` (read, flattened, by ``fc1``) and the output neurons of ``fc1``. For a conv junction
every spatial position is a sample of the channels, and the consumer's every kernel tap (or, for
``fc1``, every position of the flattened map) is re-fitted by least squares from the kept
channels. When training ends the callback sweeps the kept count p of each target, and applies
the configuration with the lowest modelled energy whose accuracy drop stays within
``--max-degradation``, searched on one half of the validation set and confirmed on the other.
The script then prints the test accuracy before and after and the energy ratio, saves the
reduced model, reloads it into a fresh module and checks that the outputs match.

Run from the repository root (a few minutes on two idle CPU cores; longer while other jobs share
them)::

    python examples/cnn.py
    python examples/cnn.py --epochs 1 --limit-train 5000 --joint none   # a quick look
    python examples/cnn.py --targets net.conv1 net.conv2                # the conv channels only

The MNIST IDX files are read from ``--data-dir`` (default: ``$NEURONPRUNE_MNIST_DIR``, else
``../shared/data/mnist`` relative to the working directory or to the repository root);
``--download`` fetches them when missing (needs internet).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import KeepUnreduced, default_data_dir

from lightning_neuronprune import (
    ConfirmSettings,
    FitOptions,
    NeuronEliminationCallback,
    load_reduced,
    save_reduced,
)
from lightning_neuronprune.core.selection import METHODS
from lightning_neuronprune.search.pareto import choose
from lightning_neuronprune.search.strategies import STRATEGIES
from lightning_neuronprune.testing.datasets import MNISTDataModule, has_mnist
from lightning_neuronprune.testing.models import LitClassifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data-dir", default=default_data_dir(),
        help="directory of the MNIST IDX files ($NEURONPRUNE_MNIST_DIR overrides the default)",
    )  # fmt: skip
    parser.add_argument("--download", action="store_true", help="fetch missing MNIST files")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument(
        "--limit-train", type=int, default=None, help="use only the first N training images"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--targets", nargs="+", default=["auto"],
        help="layers whose channels or neurons are removed ('auto': every conv and Linear "
        "junction found by tracing)",
    )  # fmt: skip
    parser.add_argument(
        "--max-degradation", type=float, default=0.02,
        help="the accuracy budget as a fraction (0.02 = 2 points)",
    )  # fmt: skip
    parser.add_argument(
        "--ranks", default="auto",
        help="the grid of p per layer: 'auto', 'all', or an integer step",
    )  # fmt: skip
    parser.add_argument(
        "--val-size", type=int, default=5000,
        help="training images held out (the last ones) as the validation set",
    )  # fmt: skip
    parser.add_argument(
        "--joint", choices=[*STRATEGIES, "none"], default="greedy",
        help="also search joint configurations of all targets under the one budget",
    )  # fmt: skip
    parser.add_argument(
        "--method", choices=METHODS, default="output",
        help="channel selection: output-aware greedy, the paper's svd_qr, or nested qr",
    )  # fmt: skip
    parser.add_argument(
        "--max-samples", type=int, default=None,
        help="training images (per process) whose activations give the statistics",
    )  # fmt: skip
    parser.add_argument("--output", default="cnn_reduced.pt", help="where to save the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.limit_train is not None and args.limit_train < 1:
        parser.error(f"--limit-train must be positive, got {args.limit_train}")
    if args.ranks not in ("auto", "all"):
        try:
            args.ranks = int(args.ranks)
        except ValueError:
            parser.error(f"--ranks must be 'auto', 'all' or an integer, got {args.ranks!r}")
    if not args.download and not has_mnist(args.data_dir):
        parser.error(
            f"the MNIST IDX files are not in {args.data_dir!r}: pass --data-dir, set "
            "NEURONPRUNE_MNIST_DIR, or add --download (needs internet)"
        )
    return args


def widths(model: LitClassifier) -> str:
    net = model.net
    return (
        f"conv1 {net.conv1.out_channels} channels, conv2 {net.conv2.out_channels} channels, "
        f"fc1 {net.fc1.in_features} → {net.fc1.out_features}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    pl.seed_everything(args.seed, workers=True)
    dm = MNISTDataModule(
        args.data_dir, batch_size=args.batch_size, val_size=args.val_size,
        limit_train=args.limit_train, download=args.download,
    )  # fmt: skip
    model = LitClassifier("lenet5", lr=args.lr, epochs=args.epochs)
    snapshot = KeepUnreduced()
    pruner = NeuronEliminationCallback(
        targets="auto" if args.targets == ["auto"] else args.targets,
        max_degradation=args.max_degradation,
        ranks=args.ranks,
        fit=FitOptions(method=args.method),
        joint=None if args.joint == "none" else args.joint,
        confirm=ConfirmSettings(),
        max_samples=args.max_samples,
        verbose=False,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        callbacks=[snapshot, pruner],  # the snapshot's on_train_end runs first
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic="warn",
    )
    print(f"LeNet-5 before: {widths(model)}")
    trainer.fit(model, datamodule=dm)

    result = pruner.result
    assert result is not None  # the fit finished, so the callback ran
    print("\n=== Channel and neuron elimination " + "=" * 36)
    print(f"targets: {list(result.points)}; budget: accuracy drop ≤ {args.max_degradation:.2%}")
    for layer, pts in result.points.items():  # each target alone, within the budget
        best = choose([pt for pt in pts if pt.p < pt.n], result.budget)
        alone = (
            "no p within the budget"
            if best is None
            else (
                f"alone p={best.p} (energy {best.energy_ratio:.2f}× lower, drop "
                f"{best.accuracy_drop:+.4f})"
            )
        )
        print(f"  {layer:<10} n={pts[0].n:<4} {alone}")
    c = result.decision.chosen
    if not result.applied or c is None:
        print("applied: nothing (no configuration within the budget); the model is unchanged")
    else:
        print(f"applied: {dict(result.decision.plan)}")
        print(
            f"energy ratio: {c.energy_ratio:.2f}× lower modelled energy, parameter memory "
            f"{c.memory_ratio:.2f}× lower (validation accuracy {c.accuracy:.4f}, drop "
            f"{c.accuracy_drop:+.4f})"
        )
    print(f"LeNet-5 after: {widths(model)}")

    unreduced = LitClassifier("lenet5", lr=args.lr, epochs=args.epochs)
    unreduced.load_state_dict(snapshot.state_dict)
    checker = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    test_before = checker.test(unreduced, datamodule=dm, verbose=False)[0]["test_acc"]
    test_after = checker.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    print(f"test accuracy: {test_before:.4f} before, {test_after:.4f} after the reduction")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model.cpu().eval()
    save_reduced(model, output)
    reloaded = load_reduced(LitClassifier("lenet5", lr=args.lr, epochs=args.epochs), output)
    x, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        expected, got = model(x), reloaded.eval()(x)
    if not torch.allclose(expected, got, rtol=1e-5, atol=1e-5):
        print("ERROR: the reloaded model differs from the reduced one", file=sys.stderr)
        return 1
    n_before = sum(p.numel() for p in unreduced.parameters())
    n_after = sum(p.numel() for p in reloaded.parameters())
    print(f"saved the reduced model to {output} ({n_before} -> {n_after} parameters); "
          "reloaded with load_reduced: outputs match")  # fmt: skip
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
