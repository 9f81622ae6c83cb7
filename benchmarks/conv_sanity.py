"""A quick sanity check of conv junctions on MNIST (issue 17), not the issue's benchmark.

Two networks are trained briefly on MNIST (``--train`` images, 2 epochs, Adam): LeNet-5 (Caffe
variant, no BatchNorm) and a small VGG-style CNN (16-32-64-64 channels, each conv followed by
BatchNorm2d and ReLU, max pooling after the last three, then a Linear). Every conv junction of
each (:func:`~lightning_neuronprune.structure.discovery.auto_conv_junctions`: LeNet-5's
``conv1 → conv2`` and ``conv2 → fc1``; the VGG's three conv → conv junctions and its last
conv → flatten → Linear) keeps the same fraction of its channels, from the statistics of 2,000
other training images; the 10,000 test images are scored. Compared at equal shapes:

* ``svd_qr`` and ``output`` selection with the per-tap refit, one-shot (every junction fitted on
  the original network's statistics) and sequential (``eliminate_neurons`` with ``data``: each
  junction fitted on the network reduced upstream);
* L1 selection of the producer's filters with no refit (the consumer keeps its columns).

With ``--sweep``, :func:`~lightning_neuronprune.search.sweep.sweep_junction` runs over every p of
LeNet-5's junctions (``method="output"``) and prints a few points with their whole-network energy
ratio.

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
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.search.elimination import eliminate_neurons
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.sweep import sweep_junction
from lightning_neuronprune.structure.conv import statistics_channels
from lightning_neuronprune.structure.discovery import auto_conv_junctions, find_junction
from lightning_neuronprune.structure.surgery import apply_reduction
from lightning_neuronprune.testing.datasets import load_mnist
from lightning_neuronprune.testing.models import LeNet5

DEFAULT_DATA = os.environ.get(
    "NEURONPRUNE_MNIST_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/mnist")
)


def small_vgg() -> nn.Sequential:
    """16-32-64-64 channels, conv 3×3 → BatchNorm2d → ReLU, max pooling after the last three."""
    layers: list[nn.Module] = []
    widths = [1, 16, 32, 64, 64]
    for i in range(4):
        layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.BatchNorm2d(widths[i + 1])]
        layers += [nn.ReLU()] + ([nn.MaxPool2d(2)] if i else [])
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 3 * 3, 10))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.time()
    model.train()
    for _ in range(2):
        for idx in torch.randperm(n).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"{type(model).__name__} trained on {n} images, 2 epochs, in {time.time() - start:.0f} s")
    return model.eval()


def _l1_without_refit(model: nn.Module, targets: dict[str, int]) -> nn.Module:
    reduced = copy.deepcopy(model)
    for name in reversed(list(targets)):  # downstream first: the consumer still has its columns
        j = find_junction(reduced, name)
        prod, cons = reduced.get_submodule(j.producer), reduced.get_submodule(j.consumer)
        p = targets[name]
        kept = prod.weight.detach().abs().flatten(1).sum(1).topk(p).indices.sort().values
        W = cons.weight.detach()
        m = W.shape[0]
        W_p = W.reshape(m, j.num_features, -1)[:, kept]  # (m, p, taps)
        W_p = W_p.reshape(m, p, *W.shape[2:]) if W.dim() > 2 else W_p.reshape(m, -1)
        bias = cons.bias.detach() if cons.bias is not None else None
        apply_reduction(reduced, j, kept, W_p, bias)
    return reduced


def compare(model: nn.Module, calib, test, fractions: list[float]) -> None:
    junctions = auto_conv_junctions(model)
    energy, example = EnergyModel(), test[0][0][:1]
    base = energy.estimate(model, example)

    @torch.no_grad()
    def row(label: str, net: nn.Module) -> None:
        acc = sum(int((net(x).argmax(1) == y).sum()) for x, y in test)
        acc /= sum(len(y) for _, y in test)
        e = energy.estimate(net, example)
        print(
            f"  {label:36s} test {100 * acc:6.2f}%  energy x{base.energy_ratio(e):5.2f}  "
            f"MACs x{base.mac / e.mac:5.2f}"
        )

    row("unreduced", model)
    consumers = [j.consumer for j in junctions]
    stats = collect_statistics(
        model, consumers, calib, channels=statistics_channels(model, junctions)
    )
    for frac in fractions:
        ps = {j.target: max(1, round(j.num_features * frac)) for j in junctions}
        print(f" keeping {frac:.0%} of each junction's channels: {ps}")
        for method in ("svd_qr", "output"):
            one_shot = eliminate_neurons(model, ps, stats=stats, method=method)[0]
            row(f"{method} + refit, one-shot", one_shot)
            row(
                f"{method} + refit, sequential",
                eliminate_neurons(model, ps, data=calib, method=method)[0],
            )
        row("L1, no refit", _l1_without_refit(model, ps))


def sweeps(model: nn.Module, calib, test) -> None:
    energy, example = EnergyModel(), test[0][0][:1]
    for j in auto_conv_junctions(model):
        start = time.time()
        st = collect_statistics(
            model, [j.consumer], calib, channels=statistics_channels(model, [j])
        )[j.consumer]
        evaluator = CachedEvaluator(
            model, j.consumer, test, MulticlassAccuracy(10, average="micro")
        )
        points = sweep_junction(model, j, st, evaluator, energy, example, method="output")
        print(
            f" sweep {j.layer} → {j.consumer}: {len(points)} points in {time.time() - start:.1f} s"
        )
        for pt in points:
            if pt.p in {j.num_features, j.num_features // 2, j.num_features // 4, 5, 2, 1}:
                acc, drop = 100 * pt.accuracy, 100 * pt.accuracy_drop
                print(
                    f"  p={pt.p:3d} test {acc:6.2f}%  drop {drop:5.2f} pt  x{pt.energy_ratio:5.2f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg"])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_tr, y_tr = load_mnist(args.data, "train")
    x_te, y_te = load_mnist(args.data, "test")
    calib = [
        (x_tr[40000 + i : 40500 + i], y_tr[40000 + i : 40500 + i]) for i in range(0, 2000, 500)
    ]
    test = list(zip(x_te.split(1000), y_te.split(1000), strict=True))
    for name in args.models:
        torch.manual_seed(0)
        model = _train(LeNet5() if name == "lenet5" else small_vgg(), x_tr, y_tr, args.train)
        compare(model, calib, test, args.fractions)
        if args.sweep and name == "lenet5":
            sweeps(model, calib, test)


if __name__ == "__main__":
    main()
