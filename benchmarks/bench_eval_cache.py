"""Sweep wall time with and without the evaluation cache, in one run.

LeNet-5 (trained, cached by benchmarks/common.py), target FC1 as the paper names it (our
``net.fc1:in``, the 800 flattened conv features) and our ``net.fc1`` (its 500 neurons), statistics
from the 60000 training images, evaluation on the 10000 test images, the same rank grid for both.

    python benchmarks/bench_eval_cache.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import time

import torch
from common import DEFAULT_MNIST, loader, mnist_tensors, trained
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import EnergyModel, collect_statistics, find_junction
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.sweep import sweep_junction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_MNIST)
    parser.add_argument("--ranks", type=int, default=16, help="grid step in p")
    parser.add_argument("--eval-size", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default recipe)")
    args = parser.parse_args()

    data = mnist_tensors(args.data_dir)
    model = trained("lenet5", args.data_dir, epochs=args.epochs)
    x_test, y_test = data["test"]
    eval_loader = loader(x_test[: args.eval_size], y_test[: args.eval_size])
    example = x_test[:1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'target':<12} {'cache':>6} {'points':>6} {'setup s':>8} {'sweep s':>8} {'total s':>8}")
    for target in ("net.fc1:in", "net.fc1"):
        junction = find_junction(model, target)
        stats = collect_statistics(model, [junction.consumer], loader(*data["train"]))[
            junction.consumer
        ]
        times = {}
        curves = {}
        for cache in (False, True):
            t0 = time.perf_counter()
            evaluator = CachedEvaluator(
                model, junction.consumer, eval_loader, MulticlassAccuracy(10), cache=cache
            )
            t1 = time.perf_counter()
            points = sweep_junction(
                model, junction, stats, evaluator, EnergyModel(), example, ranks=args.ranks
            )
            t2 = time.perf_counter()
            times[cache] = t2 - t0
            curves[cache] = [(pt.p, pt.accuracy) for pt in points]
            print(
                f"{target:<12} {str(evaluator.cached):>6} {len(points):>6} {t1 - t0:>8.2f} "
                f"{t2 - t1:>8.2f} {t2 - t0:>8.2f}"
            )
        same = all(
            a[0] == b[0] and abs(a[1] - b[1]) < 1e-6
            for a, b in zip(curves[False], curves[True], strict=True)
        )
        print(
            f"{target:<12} speed-up with cache: {times[False] / times[True]:.2f}x "
            f"(identical accuracy curves: {same})"
        )


if __name__ == "__main__":
    main()
