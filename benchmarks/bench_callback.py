"""The callback's own time on each device: MNIST LeNet-300-100, as a user runs it.

LeNet-300-100 is trained for ``--epochs`` epochs (or loaded from ``benchmarks/.cache``). Then,
for every device and joint mode, one more ``Trainer.fit`` trains a single batch with learning
rate 0 (the weights do not change), so that ``NeuronEliminationCallback`` runs in
``on_train_end`` exactly as after a real fit: statistics over the 55000 training images, the
sweep of ``net.fc1:in``, ``net.fc1`` and ``net.fc2`` over the default grid, evaluated on the 5000
validation images, the choice and the surgery. Only ``on_train_end`` is timed (the device is
synchronised before and after). One untimed warm-up run per device loads the device's libraries
first (cuBLAS, cuSOLVER), as any earlier work of a real job would have.

Examples::

    python benchmarks/bench_callback.py --devices cuda cpu          # the GPU against the host
    python benchmarks/bench_callback.py --devices cpu --epochs 1 --limit-train 5000   # dry run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_MNIST, trained  # noqa: E402
from report import Report, machine_description, md_table  # noqa: E402

from lightning_neuronprune import (  # noqa: E402
    ConfirmSettings,
    FitOptions,
    NeuronEliminationCallback,
)
from lightning_neuronprune.testing.datasets import MNISTDataModule  # noqa: E402
from lightning_neuronprune.testing.models import LitClassifier  # noqa: E402

TARGETS = ["net.fc1:in", "net.fc1", "net.fc2"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedCallback(NeuronEliminationCallback):
    """The callback, with its ``on_train_end`` timed (and optionally profiled)."""

    def __init__(self, *args: Any, profile: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = float("nan")
        self.profile = cProfile.Profile() if profile else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        _sync(device)
        t0 = time.perf_counter()
        if self.profile is not None:
            self.profile.enable()
        super().on_train_end(trainer, pl_module)
        _sync(device)
        if self.profile is not None:
            self.profile.disable()
        self.seconds = time.perf_counter() - t0


def run_once(
    state: dict[str, torch.Tensor], device: str, joint: str | None, args: argparse.Namespace,
    *, ranks: Any = "auto", profile: bool = False,
) -> TimedCallback:  # fmt: skip
    model = LitClassifier("lenet300100", lr=0.0)
    model.load_state_dict(state)
    callback = TimedCallback(
        targets=TARGETS, ranks=ranks, joint=joint, profile=profile,
        fit=FitOptions(method=args.method),
        confirm=ConfirmSettings(fraction=args.confirm_fraction) if args.confirm_fraction else None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=device, devices=1, max_epochs=1, limit_train_batches=1,
            num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root, callbacks=[callback],
        )  # fmt: skip
        dm = MNISTDataModule(args.data_dir, batch_size=128, limit_train=args.limit_train)
        trainer.fit(model, datamodule=dm)
    return callback


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_MNIST)
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--joint", nargs="+", default=["none", "greedy"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile text of each run")
    parser.add_argument(
        "--method", default="svd_qr", help="selection method (default: the paper's svd_qr)"
    )
    parser.add_argument(
        "--confirm-fraction", type=float, default=None, help="held-out confirmation (default off)"
    )
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--section", default="bench_callback")
    args = parser.parse_args(argv)

    report = Report(args.markdown, args.section, "bench_callback.py")
    first = torch.device(args.devices[0] if args.devices[0] != "cuda" else "cuda:0")
    report.add(
        f"### bench_callback.py\n\nMachine: {machine_description(first)}. Command: "
        f"`{' '.join(['python', 'benchmarks/bench_callback.py', *sys.argv[1:]])}`."
    )
    net = trained("lenet300100", args.data_dir, epochs=args.epochs, limit_train=args.limit_train)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    rows, seconds, profiles = [], {}, []
    for device in args.devices:
        run_once(state, device, None, args, ranks=[1])  # warm-up: the device's libraries
        for joint in args.joint:
            mode = None if joint == "none" else joint
            cb = run_once(state, device, mode, args, profile=args.profile is not None)
            seconds[(device, joint)] = cb.seconds
            result = cb.result
            assert result is not None  # the fit finished, so the callback ran
            chosen = result.decision.chosen
            plan = dict(result.decision.plan) if result.applied else {}
            rows.append(
                [
                    device, joint, f"{cb.seconds:.2f}", len(result.every), str(plan),
                    f"{chosen.energy_ratio:.2f}x" if chosen is not None else "—",
                    f"{100 * chosen.accuracy_drop:.2f}" if chosen is not None else "—",
                ]
            )  # fmt: skip
            print(f"{device} joint={joint}: {cb.seconds:.2f} s", flush=True)
            if cb.profile is not None:
                text = io.StringIO()
                pstats.Stats(cb.profile, stream=text).sort_stats("cumulative").print_stats(35)
                profiles.append(f"## {device} joint={joint}\n{text.getvalue()}")
    ratios = []
    if len(args.devices) > 1:
        a, b = args.devices[0], args.devices[1]
        for joint in args.joint:
            ratios.append([joint, f"{seconds[(b, joint)] / seconds[(a, joint)]:.2f}x"])
    report.add(
        f"#### NeuronEliminationCallback on LeNet-300-100 ({args.epochs} epochs), targets "
        f"{', '.join(f'`{t}`' for t in TARGETS)}, default grid, method `{args.method}`, "
        f"confirm_fraction {args.confirm_fraction}\n\n"
        "Seconds of `on_train_end` (statistics, sweeps, joint search, choice, surgery), after "
        "one warm-up run per device:\n\n"
        + md_table(
            ["device", "joint", "seconds", "points", "applied", "energy ratio", "val drop [pt]"],
            rows,
        )
        + (
            f"\n\n{args.devices[1]} time / {args.devices[0]} time:\n\n"
            + md_table(["joint", "ratio"], ratios)
            if ratios
            else ""
        )
    )
    if args.profile is not None:
        args.profile.write_text("\n".join(profiles))


if __name__ == "__main__":
    main()
