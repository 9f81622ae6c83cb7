"""Time of the statistics and the sweep of every conv junction of a small CNN, on the CPU.

For each network, the statistics of every conv junction's consumer are collected in one pass
over the calibration images (:func:`~lightning_neuronprune.core.recording.collect_statistics`),
then every junction is swept on its own over the evaluation images
(:class:`~lightning_neuronprune.search.evaluation.CachedEvaluator` and
:func:`~lightning_neuronprune.search.sweep.sweep_junction`, ``method="output"``, the default
``ranks="auto"`` grid, which has every p for these widths; no early stop unless ``--stop``).
The baseline is a plain forward pass of the unreduced network over the same evaluation
images, timed in the same run (best of two), so the figures read as "forward passes":

* the **small VGG** of ``bench_cnn.py`` (4 conv 3×3 layers of 16-32-64-64 channels with
  BatchNorm2d and ReLU; junctions ``conv → conv`` ×3 and ``conv → flatten → Linear``), with the
  trained weights ``bench_cnn.py`` caches, or seeded random weights (timing only) when missing,
  on Fashion-MNIST;
* **LeNet-5** (``conv1 → conv2`` and ``conv2 → flatten → fc1``), seeded random weights, on
  MNIST-sized random images (the time does not depend on the weights without ``--stop``).

Run from the repository root (one thread, as the figures in docs/RESULTS.md)::

    python benchmarks/bench_conv_speed.py
    python benchmarks/bench_conv_speed.py --models vgg --eval 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cnn import FASHION_DIR, VGG_CACHE, load_fashion_mnist, small_vgg
from report import machine_description, md_table

from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.sweep import sweep_junction
from lightning_neuronprune.structure.conv import statistics_channels
from lightning_neuronprune.structure.discovery import auto_conv_junctions
from lightning_neuronprune.testing.models import LeNet5


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def network(name: str, args: argparse.Namespace) -> tuple[nn.Module, list, list, str]:
    """The network, its calibration and evaluation batches (500 images each) and a note."""
    torch.manual_seed(0)
    if name == "vgg":
        data = load_fashion_mnist(args.data_dir)
        (x, y), (x_te, y_te) = data["train"], data["test"]
        net, path = small_vgg(), Path(args.vgg_checkpoint or VGG_CACHE.format(epochs=15))
        note = "random weights"
        if path.exists():
            net.load_state_dict(torch.load(path, weights_only=True))
            note = f"weights {path.name}"
    else:
        x, y = torch.randn(args.calib, 1, 28, 28), torch.randint(0, 10, (args.calib,))
        x_te, y_te = torch.randn(args.eval, 1, 28, 28), torch.randint(0, 10, (args.eval,))
        net, note = LeNet5(), "random weights"
    calib = list(zip(x[: args.calib].split(500), y[: args.calib].split(500), strict=True))
    evaluation = list(zip(x_te[: args.eval].split(500), y_te[: args.eval].split(500), strict=True))
    return net.eval(), calib, evaluation, note


def measure(name: str, args: argparse.Namespace) -> tuple[list[list[str]], str]:
    net, calib, evaluation, note = network(name, args)

    @torch.no_grad()
    def forward() -> None:
        for x, _ in evaluation:
            net(x)

    load = [os.getloadavg()[0]]
    base = min(timed(forward) for _ in range(2))
    junctions = auto_conv_junctions(net)
    stats: dict = {}

    def statistics() -> None:
        channels = statistics_channels(net, junctions)
        consumers = [j.consumer for j in junctions]
        stats.update(collect_statistics(net, consumers, calib, channels=channels))

    t_stats = timed(statistics)
    rows, energy, example = [], EnergyModel(), evaluation[0][0][:1]
    row = [name, "statistics (all junctions)", "", f"{t_stats:.1f}", f"{t_stats / base:.2f}"]
    rows.append(row + ["", "", ""] * args.compare)
    total = {True: t_stats, False: t_stats}
    for j in junctions:
        points: list = []
        seconds = {}

        def sweep(layout: bool, j=j, points=points) -> None:
            metric = MulticlassAccuracy(10, average="micro")
            evaluator = CachedEvaluator(
                net, j.consumer, evaluation, metric, channels_last=None if layout else False
            )
            points[:] = sweep_junction(
                net, j, stats[j.consumer], evaluator, energy, example, method="output",
                max_accuracy_drop=args.stop,
            )  # fmt: skip

        for layout in (False, True) if args.compare else (True,):  # the default layout last
            seconds[layout] = timed(lambda layout=layout: sweep(layout))
            total[layout] += seconds[layout]
        label, s = f"sweep {j.layer} → {j.consumer}", seconds[True]
        rows.append([name, label, str(len(points) - 1), f"{s:.1f}", f"{s / base:.2f}"])
        if args.compare:
            s0 = seconds[False]
            rows[-1] += [f"{s0:.1f}", f"{s0 / base:.2f}", f"{s0 / s:.2f}×"]
        print(" | ".join(rows[-1]), flush=True)
    t = total[True]
    rows.append([name, "**total**", "", f"**{t:.1f}**", f"**{t / base:.2f}**"])
    if args.compare:
        t0 = total[False]
        rows[-1] += [f"{t0:.1f}", f"{t0 / base:.2f}", f"{t0 / t:.2f}×"]
    load.append(os.getloadavg()[0])
    caption = (
        f"{name}: {note}; {args.calib} calibration and {args.eval} evaluation images; one forward "
        f"pass over the evaluation images: {base:.2f} s; load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end."
    )
    return rows, caption


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["vgg", "lenet5"], default=["vgg", "lenet5"])
    parser.add_argument("--data-dir", default=FASHION_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--vgg-checkpoint", default=None)
    parser.add_argument("--calib", type=int, default=2000, help="calibration images")
    parser.add_argument("--eval", type=int, default=2000, help="evaluation images")
    parser.add_argument(
        "--stop", type=float, default=None, help="stop each sweep past this accuracy drop"
    )
    parser.add_argument(
        "--compare", action="store_true",
        help="also sweep with the cached maps in the default layout (channels_last=False), "
        "just before each sweep in the package's default",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"Machine: {machine_description()}\n", flush=True)
    rows, captions = [], []
    for name in args.models:
        r, caption = measure(name, args)
        rows += r
        captions.append(caption)
    header = ["network", "step", "points", "seconds", "× one forward pass"]
    if args.compare:
        header += ["seconds, default layout", "× one forward pass", "default layout / ours"]
    print()
    print(md_table(header, rows))
    print()
    print("\n".join(f"- {c}" for c in captions))
    print(f"\nTotal: {time.perf_counter() - started:.0f} s on {machine_description()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
