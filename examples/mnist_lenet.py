"""Train LeNet-300-100 or LeNet-5 on MNIST, then remove redundant neurons without retraining.

The :class:`~lightning_neuronprune.NeuronEliminationCallback` runs when ``trainer.fit`` ends: it
sweeps the number of kept neurons p for every target layer (and, with ``--joint``, searches
configurations of all targets at once), logs the accuracy/energy trade-off to TensorBoard, and
applies the configuration with the lowest modelled energy whose accuracy drop stays within
``--max-degradation``: searched on one half of the validation set and confirmed on the other
(with the callback's default 90% upper confidence bound, corrected for the candidates tried), so
that the budget holds on data the search never saw. The reduced model is then tested (the test
drop is printed against the budget), saved with :func:`~lightning_neuronprune.save_reduced`,
reloaded into a fresh ``LitClassifier`` with
:func:`~lightning_neuronprune.load_reduced`, and checked against the in-memory one.

Run from the repository root (about half a minute on two idle CPU cores with the defaults; a few
times longer for LeNet-5, and much longer while other jobs share the cores)::

    python examples/mnist_lenet.py
    python examples/mnist_lenet.py --arch lenet5
    python examples/mnist_lenet.py --epochs 1 --limit-train 5000 --joint none   # a quick look
    tensorboard --logdir lightning_logs

Target names follow the API of the callback: ``net.fc1`` removes fc1's output neurons (the
paper's "FC2" row, which names the consumer), ``net.fc1:in`` removes fc1's input pixels (the
paper's "FC1" row of LeNet-300-100).

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
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_neuronprune import (
    ConfirmSettings,
    FitOptions,
    NeuronEliminationCallback,
    load_reduced,
    save_reduced,
)
from lightning_neuronprune.core.selection import METHODS
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.pareto import choose
from lightning_neuronprune.search.strategies import STRATEGIES
from lightning_neuronprune.search.sweep import SweepPoint
from lightning_neuronprune.testing.datasets import MNISTDataModule, has_mnist
from lightning_neuronprune.testing.models import LitClassifier

DEFAULT_TARGETS = {
    "lenet300100": ["net.fc1", "net.fc2", "net.fc1:in"],
    "lenet5": ["net.fc1", "net.fc1:in"],
}
DEFAULT_EPOCHS = {"lenet300100": 5, "lenet5": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arch", choices=sorted(DEFAULT_TARGETS), default="lenet300100")
    parser.add_argument(
        "--data-dir", default=default_data_dir(),
        help="directory of the MNIST IDX files ($NEURONPRUNE_MNIST_DIR overrides the default)",
    )  # fmt: skip
    parser.add_argument("--download", action="store_true", help="fetch missing MNIST files")
    parser.add_argument(
        "--epochs", type=int, default=None,
        help=f"training epochs (default: {DEFAULT_EPOCHS} by architecture)",
    )  # fmt: skip
    parser.add_argument(
        "--limit-train", type=int, default=None, help="use only the first N training images"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--targets", nargs="+", default=None,
        help=f"layers whose neurons are removed (default: {DEFAULT_TARGETS} by architecture)",
    )  # fmt: skip
    parser.add_argument(
        "--max-degradation", type=float, default=0.02,
        help="the accuracy budget ε as a fraction (0.02 = 2 points)",
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
        help="neuron selection: output-aware greedy, the paper's svd_qr, or nested qr",
    )  # fmt: skip
    parser.add_argument(
        "--confirm-fraction", type=float, default=ConfirmSettings().fraction,
        help="share of the validation images held out to confirm the chosen configuration",
    )  # fmt: skip
    parser.add_argument(
        "--confirm-confidence", type=float, default=ConfirmSettings().confidence,
        help="statistical margin: the upper confidence bound of the held-out drop at this level "
        "must be within the budget (0: compare the held-out drop itself)",
    )  # fmt: skip
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard root directory")
    parser.add_argument(
        "--output",
        default=None,
        help="where to save the reduced model (default: <run dir>/reduced.pt)",
    )
    parser.add_argument(
        "--confirm-margin", type=float, default=ConfirmSettings().margin,
        help="the held-out drop (or its bound) must stay this far inside the budget",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--verbose", action="store_true", help="print one line per evaluated configuration"
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.arch]
    if args.targets is None:
        args.targets = DEFAULT_TARGETS[args.arch]
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 <= args.confirm_confidence < 1:
        parser.error(f"--confirm-confidence must lie in [0, 1), got {args.confirm_confidence}")
    if not 0 <= args.confirm_fraction < 1:
        parser.error(f"--confirm-fraction must lie in [0, 1), got {args.confirm_fraction}")
    if args.limit_train is not None and args.limit_train < 1:
        parser.error(f"--limit-train must be positive, got {args.limit_train}")
    if not args.download and not has_mnist(args.data_dir):
        parser.error(
            f"the MNIST IDX files are not in {args.data_dir!r}: pass --data-dir, set "
            "NEURONPRUNE_MNIST_DIR, or add --download (needs internet)"
        )
    return args


def summary_table(
    points: dict[str, list[SweepPoint]], budget: float, chosen: SweepPoint | None
) -> str:
    """One row per target: baseline, the best p of that layer alone within the budget, and its
    ratios. The applied configuration may be a joint one (see :func:`describe_applied`)."""
    header = (
        f"{'target':<12} {'n':>5} {'baseline acc':>12} {'best p':>7} {'acc':>7} {'drop':>7} "
        f"{'energy ×':>9} {'memory ×':>9}"
    )
    lines = [header, "-" * len(header)]
    for layer, pts in points.items():
        base = next((pt for pt in pts if pt.p == pt.n), None)
        base_acc = f"{base.accuracy:.4f}" if base is not None else "n/a"
        best = choose([pt for pt in pts if pt.p < pt.n], budget)
        n = pts[0].n if pts else 0
        if best is None:
            lines.append(f"{layer:<12} {n:>5} {base_acc:>12} {'—':>7}  (no p within the budget)")
            continue
        mark = "  <- applied" if best is chosen else ""
        lines.append(
            f"{layer:<12} {n:>5} {base_acc:>12} {best.p:>7} {best.accuracy:>7.4f} "
            f"{best.accuracy_drop:>+7.4f} {best.energy_ratio:>9.2f} {best.memory_ratio:>9.2f}{mark}"
        )
    return "\n".join(lines)


def describe_applied(pruner: NeuronEliminationCallback) -> str:
    """What the callback applied: a single layer's p or a joint configuration, and its ratios."""
    result = pruner.result
    if result is None or not result.applied:
        return "applied: nothing (no configuration within the budget); the model is unchanged"
    plan, c = dict(result.decision.plan), result.decision.chosen
    if isinstance(c, JointPoint):
        what = f"joint configuration ({c.strategy}) " + ", ".join(
            f"{layer} p={p}" for layer, p in plan.items()
        )
    else:
        what = ", ".join(f"{layer} p={p}" for layer, p in plan.items())
    if c is None:
        return f"applied: {what}"
    return (
        f"applied: {what}\n  -> energy {c.energy_ratio:.2f}× lower, parameter memory "
        f"{c.memory_ratio:.2f}× lower, validation accuracy {c.accuracy:.4f} "
        f"(drop {c.accuracy_drop:+.4f})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    pl.seed_everything(args.seed, workers=True)

    dm = MNISTDataModule(
        args.data_dir, batch_size=args.batch_size, val_size=args.val_size,
        limit_train=args.limit_train, download=args.download,
    )  # fmt: skip
    model = LitClassifier(args.arch, lr=args.lr, epochs=args.epochs)
    tb_logger = TensorBoardLogger(args.log_dir, name=f"mnist_{args.arch}")
    snapshot = KeepUnreduced()
    confirm = ConfirmSettings(
        fraction=args.confirm_fraction,
        margin=args.confirm_margin,
        confidence=args.confirm_confidence or None,
    )
    pruner = NeuronEliminationCallback(
        targets=args.targets,
        max_degradation=args.max_degradation,
        fit=FitOptions(method=args.method),
        joint=None if args.joint == "none" else args.joint,
        confirm=confirm if args.confirm_fraction else None,
        verbose=args.verbose,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=tb_logger,
        callbacks=[snapshot, pruner],  # the snapshot's on_train_end runs first
        enable_checkpointing=False,
        deterministic="warn",  # reproducible on CPU; warns for CUDA ops with no such kernel
        log_every_n_steps=50,
    )
    trainer.fit(model, datamodule=dm)

    print("\n=== Neuron elimination summary " + "=" * 40)
    print(f"architecture {args.arch}, {args.epochs} epoch(s), method {args.method}, budget: "
          f"accuracy drop ≤ {args.max_degradation:.2%} (validation set, {dm.val_size} images: "
          f"searched on {1 - args.confirm_fraction:.0%}, confirmed on "
          f"{args.confirm_fraction:.0%})")  # fmt: skip
    result = pruner.result
    assert result is not None  # the fit finished, so the callback ran
    print(summary_table(dict(result.points), result.budget, result.decision.chosen))
    print(describe_applied(pruner))

    # The reduced model's validation accuracy must be the one the sweep measured; the test set was
    # not seen by the sweep, so compare it with the unreduced weights (the snapshot). Only the
    # reduced model's test accuracy goes to TensorBoard: the side checks run without a logger.
    unreduced = LitClassifier(args.arch, lr=args.lr, epochs=args.epochs)
    unreduced.load_state_dict(snapshot.state_dict)
    checker = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    val_after = checker.validate(model, datamodule=dm, verbose=False)[0]["val_acc"]
    test_before = checker.test(unreduced, datamodule=dm, verbose=False)[0]["test_acc"]
    test_after = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    print(f"validation accuracy of the reduced model: {val_after:.4f}")
    print(f"test accuracy: {test_before:.4f} before, {test_after:.4f} after the reduction")
    test_drop = test_before - test_after
    within = "within" if test_drop <= args.max_degradation else "OVER"
    print(f"test drop: {100 * test_drop:.2f} points, {within} the budget of "
          f"{100 * args.max_degradation:.2f} points")  # fmt: skip
    for c in result.confirmations:
        bound = "" if c.upper_bound is None else f" (upper bound {100 * c.upper_bound:.2f})"
        print(f"  confirmation of {c.as_dict()['configuration']}: drop {100 * c.search_drop:.2f} "
              f"points on the search part, {100 * c.confirmed_drop:.2f} held out{bound} -> "
              f"{'applied' if c.held else 'rejected'}")  # fmt: skip

    # Save, reload into a fresh module, and check that both compute the same outputs.
    run_dir = Path(tb_logger.log_dir)
    output = Path(args.output) if args.output else run_dir / "reduced.pt"
    output.parent.mkdir(parents=True, exist_ok=True)
    model.cpu().eval()
    save_reduced(model, output)
    reloaded = load_reduced(LitClassifier(args.arch, lr=args.lr, epochs=args.epochs), output).eval()
    x, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
    n_before = sum(p.numel() for p in unreduced.parameters())
    n_after = sum(p.numel() for p in reloaded.parameters())
    if not torch.allclose(expected, got, rtol=1e-5, atol=1e-5):
        print(
            f"ERROR: the reloaded model differs from the reduced one (max abs difference "
            f"{(expected - got).abs().max().item():.3g})",
            file=sys.stderr,
        )
        return 1
    print(f"saved the reduced model to {output} ({n_before} -> {n_after} parameters); "
          "reloaded with load_reduced: outputs match")  # fmt: skip
    if pruner.report_paths:
        print(f"sweep report: {pruner.report_paths[0]} and {pruner.report_paths[1].name}")
    print(f"done in {time.perf_counter() - started:.0f}s. View the trade-off with:")
    print(f"  tensorboard --logdir {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
