"""A quick sanity check of conv junctions on LeNet-5 (issue 17), not the issue's benchmark.

LeNet-5 (Caffe variant) is trained briefly on MNIST (``--train`` images, 2 epochs, Adam); then
``conv1 → conv2`` and ``conv2 → fc1`` are reduced together, keeping a fraction of each conv's
channels, from the statistics of 2,000 other training images, and the 10,000 test images are
scored. Compared, at equal shapes:

* ``svd_qr`` and ``output`` selection with the per-tap refit, one-shot (both junctions fitted on
  the original network's statistics) and sequential (``eliminate_neurons`` with ``data``:
  ``conv2 → fc1`` fitted on the network whose conv1 is already reduced);
* L1 selection of the producer's filters with no refit (the consumer keeps its columns).

With ``--sweep``, :func:`~lightning_neuronprune.search.sweep.sweep_junction` runs over every p of
each junction (``method="output"``) and prints a few points with their whole-network energy ratio.

Example::

    python benchmarks/conv_sanity.py --data ../shared/data/mnist --sweep
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune.core.statistics import collect_statistics
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.search.elimination import eliminate_neurons
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.sweep import sweep_junction
from lightning_neuronprune.structure.conv import statistics_channels
from lightning_neuronprune.structure.discovery import find_junction
from lightning_neuronprune.structure.surgery import apply_reduction
from lightning_neuronprune.testing.datasets import load_mnist
from lightning_neuronprune.testing.models import LeNet5

DEFAULT_DATA = os.environ.get(
    "NEURONPRUNE_MNIST_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/mnist")
)


def _l1_without_refit(model: torch.nn.Module, frac: float) -> torch.nn.Module:
    reduced = copy.deepcopy(model)
    for name in ("conv2", "conv1"):  # downstream first: the consumer still has its columns
        j = find_junction(reduced, name)
        prod, cons = reduced.get_submodule(j.producer), reduced.get_submodule(j.consumer)
        p = round(j.num_features * frac)
        kept = prod.weight.detach().abs().flatten(1).sum(1).topk(p).indices.sort().values
        W = cons.weight.detach()
        m = W.shape[0]
        W_p = W.reshape(m, j.num_features, -1)[:, kept]  # (m, p, taps)
        W_p = W_p.reshape(m, p, *W.shape[2:]) if W.dim() > 2 else W_p.reshape(m, -1)
        apply_reduction(reduced, j, kept, W_p, cons.bias.detach())
    return reduced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_tr, y_tr = load_mnist(args.data, "train")
    x_te, y_te = load_mnist(args.data, "test")
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.time()
    for _ in range(2):
        for idx in torch.randperm(args.train).split(64):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    print(f"LeNet-5 trained on {args.train} images, 2 epochs, in {time.time() - start:.0f} s")
    calib = [
        (x_tr[40000 + i : 40500 + i], y_tr[40000 + i : 40500 + i]) for i in range(0, 2000, 500)
    ]
    test = list(zip(x_te.split(1000), y_te.split(1000), strict=True))
    energy, example = EnergyModel(), x_te[:1]
    base = energy.estimate(model, example)

    @torch.no_grad()
    def row(label: str, net: torch.nn.Module) -> None:
        acc = sum(int((net(x).argmax(1) == y).sum()) for x, y in test) / len(x_te)
        e = energy.estimate(net, example)
        print(
            f"{label:48s} test {100 * acc:6.2f}%  energy x{base.energy_ratio(e):5.2f}  "
            f"memory x{base.memory_ratio(e):5.2f}  MACs x{base.mac / e.mac:5.2f}"
        )

    row("unreduced", model)
    stats = collect_statistics(model, ["conv2", "fc1"], calib, channels={"fc1": 50})
    for frac in args.fractions:
        ps = {"conv1": round(20 * frac), "conv2": round(50 * frac)}
        for method in ("svd_qr", "output"):
            row(
                f"{method} one-shot {ps}",
                eliminate_neurons(model, ps, stats=stats, method=method)[0],
            )
            row(
                f"{method} sequential {ps}",
                eliminate_neurons(model, ps, data=calib, method=method)[0],
            )
        row(f"L1, no refit {ps}", _l1_without_refit(model, frac))
    if not args.sweep:
        return
    for name in ("conv1", "conv2"):
        j = find_junction(model, name)
        start = time.time()
        st = collect_statistics(
            model, [j.consumer], calib, channels=statistics_channels(model, [j])
        )[j.consumer]
        evaluator = CachedEvaluator(
            model, j.consumer, test, MulticlassAccuracy(10, average="micro")
        )
        points = sweep_junction(model, j, st, evaluator, energy, example, method="output")
        print(f"sweep {name} → {j.consumer}: {len(points)} points in {time.time() - start:.1f} s")
        for pt in points:
            if pt.p in {j.num_features, j.num_features // 2, j.num_features // 4, 5, 2, 1}:
                acc, drop = 100 * pt.accuracy, 100 * pt.accuracy_drop
                print(
                    f"  p={pt.p:3d} test {acc:6.2f}%  drop {drop:5.2f} pt  x{pt.energy_ratio:5.2f}"
                )


if __name__ == "__main__":
    main()
