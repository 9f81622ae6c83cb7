"""Conv-channel reduction against Torch-Pruning's importances, at equal shapes, no fine-tuning.

Two trained networks, each reduced to the same layer widths by every method, so that the conv
MACs are equal across a row's methods:

* **LeNet-5 on MNIST** (Caffe variant, trained a few epochs and cached under
  ``benchmarks/.cache``), whole network: the output channels of ``conv1`` (read by ``conv2``)
  and ``conv2`` (read, flattened, by ``fc1``) and the output neurons of ``fc1``. A grid of
  widths; each method's reported point is the one with the lowest modelled energy
  (:class:`~lightning_neuronprune.cost.energy.EnergyModel`, whole network) whose accuracy drop on
  5,000 held-out training images stays within ``--lenet-budget`` points, and its test drop.
  ``lenet5-search`` reduces the same network as the callback does by default instead
  (:class:`~lightning_neuronprune.search.pipeline.ReductionSearch`, the joint strategies of
  ``--lenet-joint``, the held-out confirmation) and reads the applied model's test drop.
* **A small VGG-style CNN on Fashion-MNIST** (4 conv 3×3 layers of 16-32-64-64 channels, each
  followed by BatchNorm2d and ReLU, max pooling after the last three, Linear 576 → 10; trained
  ``--vgg-epochs`` epochs and cached, or ``--vgg-checkpoint``), the largest widths with at most
  1/1.5 and 1/2 of the conv MACs: every conv's output channels kept in the same fraction, or
  allocated across the junctions by the refit's proxy.

Methods: the package's least-squares refit (statistics of the consumer's input with every
spatial position a sample, selection by ``output`` or ``svd_qr``, each kernel tap re-fitted) one-
shot (:func:`~lightning_neuronprune.core.recording.collect_statistics` once, then
:func:`~lightning_neuronprune.search.elimination.eliminate_neurons` with ``stats``) and
sequential (``eliminate_neurons`` with ``data``: each junction fitted on the network reduced
upstream), also with an intercept where the consumer does not pad with zeros ("+ intercept");
Torch-Pruning's ``MagnitudeImportance`` L1 and L2, ``TaylorImportance`` (gradients of the loss
on the calibration images) and, on the VGG, ``BNScaleImportance`` rank each layer's channels,
the rest are removed with its dependency graph, and nothing is re-fitted. Torch-Pruning is
optional: without it those rows are skipped with a note.

Calibration uses 2,000 training images; the test accuracy is on the 10,000 test images.

Run from the repository root::

    python benchmarks/bench_cnn.py
    python benchmarks/bench_cnn.py --models vgg --data-dir /usr/share/datasets/fashion-mnist

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import DEFAULT_MNIST, trained
from report import machine_description, md_table

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.search.allocation import allocation_path, proxy_curve
from lightning_neuronprune.search.elimination import eliminate_neurons
from lightning_neuronprune.structure.conv import pads_with_zeros, statistics_channels
from lightning_neuronprune.structure.conv_fit import channel_fitter
from lightning_neuronprune.structure.discovery import auto_conv_junctions, find_junction
from lightning_neuronprune.testing.datasets import read_idx

try:
    import torch_pruning as tp
except ImportError:  # optional: its rows are skipped
    tp = None

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
#: The trained small VGG, cached here per number of epochs (trained by :func:`train_vgg` when
#: missing).
VGG_CACHE = str(Path(__file__).resolve().parent / ".cache" / "vgg_fmnist-e{epochs}.pt")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
#: Our methods: selection, whether junctions whose consumer does not pad with zeros also fit an
#: intercept, one-shot or sequential.
OURS = [
    (m, i, s)
    for m, i in (("output", False), ("output", True), ("svd_qr", False))
    for s in ("one-shot", "sequential")
]
TP_IMPORTANCES = ("L1", "L2", "Taylor")
#: Torch-Pruning's importance for networks with batch norms (Network Slimming's |γ|).
TP_BN_IMPORTANCE = "BN scale"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of a channels-last copy of ``model`` (the same values; oneDNN's
    convolutions and pooling run several times faster on that layout on the CPU)."""
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return common.accuracy(fast, x.contiguous(memory_format=torch.channels_last), y)


def small_vgg(widths: Sequence[int] = (16, 32, 64, 64), num_classes: int = 10) -> nn.Sequential:
    """4 conv 3×3 (no bias) → BatchNorm2d → ReLU, max pooling after the last three, Linear."""
    c1, c2, c3, c4 = widths
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),  # 28×28
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),  # 28×28
        nn.MaxPool2d(2),  # 14×14
        nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(),  # 14×14
        nn.MaxPool2d(2),  # 7×7
        nn.Conv2d(c3, c4, 3, padding=1, bias=False), nn.BatchNorm2d(c4), nn.ReLU(),  # 7×7
        nn.MaxPool2d(2),  # 3×3
        nn.Flatten(),
        nn.Linear(c4 * 3 * 3, num_classes),
    )  # fmt: skip


def train_vgg(
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 15,
    seed: int = 0,
    report: Callable[[int, nn.Module], None] | None = None,
) -> nn.Sequential:
    """The small VGG trained on Fashion-MNIST: Adam (1e-3) with a one-cycle schedule (peak
    3e-3) over ``epochs`` epochs, batch 128, no augmentation. ``report(epoch, net)`` is called
    after every epoch (the net in eval mode; training resumes afterwards)."""
    torch.manual_seed(seed)
    net = small_vgg()
    x, y = data["train"]
    steps = epochs * ((len(x) + 127) // 128)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for epoch in range(1, epochs + 1):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if report is not None:
            report(epoch, net.eval())
    return net.eval()


def trained_vgg(
    data: dict[str, tuple[torch.Tensor, torch.Tensor]], checkpoint: str | None, epochs: int
) -> nn.Sequential:
    """The small VGG from ``checkpoint``, or trained ``epochs`` epochs by :func:`train_vgg` and
    cached there (default: ``benchmarks/.cache/vgg_fmnist-e{epochs}.pt``), printing the test
    accuracy after every epoch."""
    path = Path(checkpoint or VGG_CACHE.format(epochs=epochs))
    if path.exists():
        net = small_vgg()
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    print(f"training the small VGG on Fashion-MNIST ({epochs} epochs); caching it at {path}")
    started = time.perf_counter()

    def report(epoch: int, net: nn.Module) -> None:
        acc = accuracy(net, *data["test"])
        print(f"epoch {epoch:2d}: test accuracy {100 * acc:.2f} % "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip

    net = train_vgg(data, epochs, report=report)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


def load_fashion_mnist(root: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (x, y), "test": (x, y)}``, standardised, from the IDX files in ``root``."""
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    out = {}
    for split, (images, labels) in stems.items():
        paths = []
        for stem in (images, labels):
            found = [Path(root) / f"{stem}{ext}" for ext in (".gz", "")]
            found = [p for p in found if p.exists()]
            if not found:
                raise FileNotFoundError(
                    f"Fashion-MNIST: {stem}[.gz] is not in {root!r}. Install it with "
                    "`apt-get install dataset-fashion-mnist` (Debian; files in "
                    f"{FASHION_DIR}) or pass --data-dir"
                )
            paths.append(found[0])
        x = torch.from_numpy(read_idx(paths[0]).copy()).float().div(255).unsqueeze(1)
        y = torch.from_numpy(read_idx(paths[1]).copy()).long()
        out[split] = ((x - FASHION_MEAN) / FASHION_STD, y)
    return out


def conv_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of the conv layers for one input (``example`` has batch 1)."""
    total = 0

    def hook(m: nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        k = m.weight[0].numel()  # in_channels / groups × kernel taps
        total += out[0].numel() * k

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return total


def uniform_widths(
    model: nn.Module, example: torch.Tensor, ratio: float, step: float = 0.001
) -> tuple[list[int], float]:
    """The widths of the conv layers that keep the largest common fraction ``f`` of each conv's
    output channels (``round(n·f)``, at least 1) with at most ``1/ratio`` of the conv MACs, and
    that fraction. Only the widths change: the model itself is not modified."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    n = [c.out_channels for c in convs]
    base = conv_macs(model, example)
    f = 1.0
    while f > 0:
        widths = [max(1, round(k * f)) for k in n]
        if conv_macs_for_widths(model, widths, example) * ratio <= base:
            return widths, f
        f -= step
    raise ValueError(f"no uniform fraction reaches a conv-MAC ratio of {ratio}")


def conv_macs_for_widths(model: nn.Module, widths: Sequence[int], example: torch.Tensor) -> int:
    """Conv MACs of ``model`` were its convs' output channels cut to ``widths`` (in order)."""
    sizes, convs = {}, [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    def hook(m: nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        sizes[m] = out.shape[-2] * out.shape[-1]

    hooks = [c.register_forward_hook(hook) for c in convs]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    total, c_in = 0, convs[0].in_channels
    for conv, w in zip(convs, widths, strict=True):
        total += sizes[conv] * w * c_in * conv.weight[0, 0].numel()
        c_in = w
    return total


def proxy_widths(
    model: nn.Module, stats: dict, example: torch.Tensor, ratio: float, method: str = "output"
) -> list[int]:
    """Widths of the conv layers with at most ``1/ratio`` of the conv MACs, allocated across the
    junctions by the refit's proxy (:mod:`~lightning_neuronprune.search.allocation`): along a
    path from the unreduced network, the junction whose next narrower width leaves the least
    extra unexplained share of its consumer's output energy per conv MAC saved moves first. Uses
    the calibration statistics only (no accuracy evaluation)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    full = [model.get_submodule(n).out_channels for n in convs]
    base = conv_macs(model, example)
    junctions = {j.target: j for j in auto_conv_junctions(model)}
    widths, curves, cost = {}, {}, {}
    for i, name in enumerate(convs):
        j = junctions[name]
        fitter = channel_fitter(model, j, stats[j.consumer], FitOptions(method=method))
        widths[name] = list(range(j.num_features, 0, -1))
        curves[name] = proxy_curve(fitter, widths[name])
        narrower = [w - (k == i) for k, w in enumerate(full)]
        cost[name] = base - conv_macs_for_widths(model, narrower, example)
    for config in allocation_path(widths, curves, cost):
        chosen = [config[n] for n in convs]
        if conv_macs_for_widths(model, chosen, example) * ratio <= base:
            return chosen
    raise ValueError(f"no configuration on the path reaches a conv-MAC ratio of {ratio}")


# ---------------------------------------------------------------- the methods


def ours(
    model: nn.Module,
    targets: dict[str, int],
    calib: list[tuple[torch.Tensor, torch.Tensor]],
    method: str,
    strategy: str,
    stats: dict | None,
    intercept: bool = False,
) -> nn.Module:
    """The package's reduction to ``targets`` ({layer: p}), one-shot from ``stats`` or
    sequential from ``calib``. With ``intercept``, the junctions whose consumer does not pad
    with zeros (a ``Linear`` after a flatten, an unpadded conv) also fit one (``affine=True``),
    after the others."""
    groups = [(targets, False)]
    if intercept:
        pads = {t: pads_with_zeros(model.get_submodule(find_junction(model, t).consumer))
                for t in targets}  # fmt: skip
        groups = [
            ({t: p for t, p in targets.items() if pads[t]}, False),
            ({t: p for t, p in targets.items() if not pads[t]}, True),
        ]
    out = model
    for group, affine in groups:
        if not group:
            continue
        source = {"stats": stats} if strategy == "one-shot" else {"data": calib}
        out = eliminate_neurons(out, group, method=method, affine=affine, **source)[0]
    return out


def one_shot_stats(model: nn.Module, targets: Sequence[str], calib: list) -> dict:
    """Statistics of every target's consumer on the unreduced model."""
    junctions = auto_conv_junctions(model)
    conv = {j.target for j in junctions}
    consumers = [j.consumer for j in junctions if j.target in targets]
    consumers += [_next_linear(model, t) for t in targets if t not in conv]
    return collect_statistics(
        model, consumers, calib, channels=statistics_channels(model, junctions)
    )


def _next_linear(model: nn.Module, name: str) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[names.index(name) + 1]


def torch_pruning(
    model: nn.Module,
    targets: dict[str, int],
    importance: str,
    example: torch.Tensor,
    calib: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """Torch-Pruning: rank each target layer's output channels (or neurons) by ``importance``
    ("L1", "L2", "Taylor" or "BN scale") on the unreduced model, then remove all but the top
    ``p`` with its dependency graph (the consumer's columns and a batch norm in between go
    with them)."""
    if tp is None:
        raise RuntimeError("torch_pruning is not installed")
    model = copy.deepcopy(model).eval()
    imp = {
        "L1": lambda: tp.importance.MagnitudeImportance(p=1),
        "L2": lambda: tp.importance.MagnitudeImportance(p=2),
        "Taylor": lambda: tp.importance.TaylorImportance(),
        TP_BN_IMPORTANCE: lambda: tp.importance.BNScaleImportance(),
    }[importance]()
    if importance == "Taylor":
        if calib is None:
            raise ValueError("TaylorImportance needs calibration batches for its gradients")
        model.zero_grad()
        for x, y in calib:
            F.cross_entropy(model(x), y).backward()  # eval mode: the BN statistics stay
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    plan = []
    for name, p in targets.items():
        layer = model.get_submodule(name)
        prune_fn = (
            tp.prune_conv_out_channels
            if isinstance(layer, nn.Conv2d)
            else tp.prune_linear_out_channels
        )
        n = layer.weight.shape[0]
        group = graph.get_pruning_group(layer, prune_fn, idxs=list(range(n)))
        scores = imp(group)
        drop = scores.argsort()[: n - p].sort().values.tolist()
        plan.append((layer, prune_fn, drop))
    for layer, prune_fn, drop in plan:
        if drop:
            graph.get_pruning_group(layer, prune_fn, idxs=drop).prune()
    model.zero_grad(set_to_none=True)
    return model


def methods(with_tp: bool, batchnorm: bool = False) -> list[str]:
    names = [f"{m} + refit{' + intercept' * i}, {s}" for m, i, s in OURS]
    importances = TP_IMPORTANCES + ((TP_BN_IMPORTANCE,) if batchnorm else ())
    return names + ([f"Torch-Pruning {i}" for i in importances] if with_tp else [])


def reduce_with(
    label: str,
    model: nn.Module,
    targets: dict[str, int],
    calib: list,
    stats: dict,
    example: torch.Tensor,
) -> nn.Module:
    if label.startswith("Torch-Pruning"):
        return torch_pruning(model, targets, label.removeprefix("Torch-Pruning "), example, calib)
    head, strategy = label.rsplit(", ", 1)
    method = head.split(" + ")[0]
    return ours(model, targets, calib, method, strategy, stats, intercept="intercept" in head)


def timed(fn: Callable[[], nn.Module]) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------- LeNet-5

#: (conv1, conv2, fc1) widths of the LeNet-5 grid (unreduced: 20, 50, 500).
LENET_GRID = [
    (16, 40, 100),
    (12, 30, 60),
    (12, 25, 40),
    (10, 20, 30),
    (12, 20, 20),
    (10, 20, 20),
    (10, 18, 25),
    (9, 18, 20),
    (8, 16, 20),
    (6, 12, 15),
]


def lenet(args: argparse.Namespace, with_tp: bool) -> str:
    torch.manual_seed(0)
    started = time.perf_counter()
    from common import mnist_tensors

    data = mnist_tensors(args.mnist_dir)
    net = trained("lenet5", args.mnist_dir, epochs=args.lenet_epochs).net.eval()
    x_tr, y_tr = data["train"]
    x_te, y_te = data["test"]
    # the 5,000 validation images are the last ones (not trained on); calibrate on 2,000 others
    calib = list(zip(x_tr[-7000:-5000].split(500), y_tr[-7000:-5000].split(500), strict=True))
    x_val, y_val = x_tr[-5000:], y_tr[-5000:]
    example = x_te[:1]
    energy = EnergyModel()
    base_e = energy.estimate(net, example)
    base_val, base_test = accuracy(net, x_val, y_val), accuracy(net, x_te, y_te)
    names = ("conv1", "conv2", "fc1")
    stats = one_shot_stats(net, names, calib)
    rows, best = [], {}
    for widths in LENET_GRID:
        targets = dict(zip(names, widths, strict=True))
        for label in methods(with_tp):
            reduced, seconds = timed(
                lambda label=label, targets=targets: reduce_with(
                    label, net, targets, calib, stats, example
                )
            )
            e = energy.estimate(reduced, example)
            ratio = base_e.energy_ratio(e)
            macs = conv_macs(net, example) / conv_macs(reduced, example)
            val_drop = 100 * (base_val - accuracy(reduced, x_val, y_val))
            test_acc = accuracy(reduced, x_te, y_te)
            test_drop = 100 * (base_test - test_acc)
            rows.append(
                [
                    "/".join(map(str, widths)), label, f"{macs:.2f}×", f"{ratio:.1f}×",
                    f"{val_drop:.2f}", f"{100 * test_acc:.2f}", f"{test_drop:.2f}",
                    f"{seconds:.1f}",
                ]
            )  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
            if val_drop <= args.lenet_budget and ratio > best.get(label, (0,))[0]:
                best[label] = (ratio, widths, val_drop, test_drop)
    header = [
        "widths conv1/conv2/fc1", "method", "conv MACs lower", "energy lower (whole net)",
        "validation drop (pt)", "test accuracy (%)", "test drop (pt)", "reduction time (s)",
    ]  # fmt: skip
    summary = [
        [label, f"{r:.1f}×", "/".join(map(str, w)), f"{v:.2f}", f"{t:.2f}"]
        for label, (r, w, v, t) in best.items()
    ]
    summary += [[label, "none within budget", "", "", ""] for label in methods(with_tp)
                if label not in best]  # fmt: skip
    return (
        f"### LeNet-5 on MNIST, whole network\n\n"
        f"Unreduced: test accuracy {100 * base_test:.2f} %, validation {100 * base_val:.2f} % "
        f"(5,000 held-out training images); trained {args.lenet_epochs} epochs.\n\n"
        + md_table(header, rows)
        + f"\n\nEach method's lowest modelled energy with a validation drop ≤ "
        f"{args.lenet_budget} pt:\n\n"
        + md_table(
            ["method", "energy lower", "widths", "validation drop (pt)", "test drop (pt)"],
            summary,
        )
        + f"\n\nLeNet-5 part: {time.perf_counter() - started:.0f} s.\n"
    )


def lenet_search(args: argparse.Namespace) -> str:
    """LeNet-5 reduced as the callback does by default: statistics of every junction (``conv1``,
    ``conv2``, ``fc1``) on training images, per-layer sweeps and the joint search on one half of
    the 5,000 validation images, the cheapest configuration confirmed on the other half
    (``ConfirmSettings()``: the upper 90 % bound of the held-out drop within 3/4 of the budget),
    then the test drop of the applied model."""
    from common import mnist_tensors
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_neuronprune.search.pipeline import ReductionSearch
    from lightning_neuronprune.search.settings import (
        ConfirmSettings,
        JointSettings,
        SearchSettings,
    )
    from lightning_neuronprune.structure.discovery import find_junction

    torch.manual_seed(0)
    data = mnist_tensors(args.mnist_dir)
    net = trained("lenet5", args.mnist_dir, epochs=args.lenet_epochs).net.eval()
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    n = args.lenet_search_samples
    x_cal, y_cal = x_tr[-5000 - n : -5000], y_tr[-5000 - n : -5000]
    train = list(zip(x_cal.split(500), y_cal.split(500), strict=True))
    val = list(zip(x_tr[-5000:].split(500), y_tr[-5000:].split(500), strict=True))
    example, energy = x_te[:1], EnergyModel()
    base_e, base_test = energy.estimate(net, example), accuracy(net, x_te, y_te)
    rows = []
    for strategy in args.lenet_joint:
        started = time.perf_counter()
        model = copy.deepcopy(net)
        junctions = [find_junction(model, t) for t in ("conv1", "conv2", "fc1")]
        stats = collect_statistics(
            model, [j.consumer for j in junctions], train,
            channels=statistics_channels(model, junctions),
        )  # fmt: skip
        settings = SearchSettings(
            max_degradation=args.lenet_budget / 100, options=FitOptions(method="output"),
            joint=JointSettings(strategy=strategy), confirm=ConfirmSettings(),
            ranks=args.lenet_ranks,
        )  # fmt: skip
        search = ReductionSearch(model, junctions, stats, energy, settings)
        result = search.run(val, MulticlassAccuracy(10, average="micro"), example, train_data=train)
        search.apply(model, result.decision)
        chosen = result.decision.chosen
        ratio = base_e.energy_ratio(energy.estimate(model, example))
        test_drop = 100 * (base_test - accuracy(model, x_te, y_te))
        plan = dict(result.decision.plan) if chosen is not None else {}
        rows.append(
            [
                strategy, "/".join(str(plan.get(t, "-")) for t in ("conv1", "conv2", "fc1")),
                f"{ratio:.1f}×",
                f"{100 * chosen.accuracy_drop:.2f}" if chosen is not None else "",
                f"{test_drop:.2f}", f"{time.perf_counter() - started:.0f}",
            ]
        )  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "joint strategy", "widths conv1/conv2/fc1", "energy lower (whole net)",
        "search drop (pt)", "test drop (pt)", "seconds",
    ]  # fmt: skip
    return (
        "### LeNet-5 with the callback's search and held-out confirmation\n\n"
        f"Budget {args.lenet_budget} pt; statistics on {n} training images; `output` "
        f"selection, `ranks={args.lenet_ranks!r}`; confirmation `ConfirmSettings()`.\n\n"
        + md_table(header, rows)
        + "\n"
    )


# ---------------------------------------------------------------- small VGG


def vgg(args: argparse.Namespace, with_tp: bool) -> str:
    torch.manual_seed(0)
    started = time.perf_counter()
    data = load_fashion_mnist(args.data_dir)
    net = trained_vgg(data, args.vgg_checkpoint, args.vgg_epochs)
    x_tr, y_tr = data["train"]
    x_te, y_te = data["test"]
    calib = list(zip(x_tr[:2000].split(500), y_tr[:2000].split(500), strict=True))
    example = x_te[:1]
    base_test = accuracy(net, x_te, y_te)
    base_macs = conv_macs(net, example)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    stats = one_shot_stats(net, convs, calib)
    tables = []
    for allocation in args.allocations:
        rows = vgg_rows(
            args, net, calib, stats, (example, x_te, y_te, base_test), allocation, with_tp
        )
        title = {
            "uniform": "every conv keeps the same fraction of its channels",
            "proxy": "allocated by the refit's proxy (calibration statistics only)",
        }[allocation]
        tables.append(f"Widths: {title}.\n\n" + md_table(VGG_HEADER, rows))
    return (
        f"### Small VGG-style CNN on Fashion-MNIST\n\n"
        f"Unreduced: test accuracy {100 * base_test:.2f} %, {base_macs:,} conv MACs per image.\n\n"
        + "\n\n".join(tables)
        + f"\n\nVGG part: {time.perf_counter() - started:.0f} s.\n"
    )


VGG_HEADER = [
    "target", "widths", "method", "conv MACs lower", "test accuracy (%)", "test drop (pt)",
    "reduction time (s)",
]  # fmt: skip


def vgg_rows(
    args: argparse.Namespace,
    net: nn.Module,
    calib: list,
    stats: dict,
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float],
    allocation: str,
    with_tp: bool,
) -> list[list[str]]:
    """One row per ratio and method: the widths of ``allocation``, the conv MACs, the test
    accuracy (``test``: an example input, the test images and labels, the unreduced accuracy)."""
    example, x_te, y_te, base_test = test
    base_macs = conv_macs(net, example)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    rows = []
    for ratio in args.ratios:
        if allocation == "uniform":
            widths, _ = uniform_widths(net, example, ratio)
        else:
            widths = proxy_widths(net, stats, example, ratio)
        targets = dict(zip(convs, widths, strict=True))
        for label in methods(with_tp, batchnorm=True):
            reduced, seconds = timed(
                lambda label=label, targets=targets: reduce_with(
                    label, net, targets, calib, stats, example
                )
            )
            macs = base_macs / conv_macs(reduced, example)
            acc = accuracy(reduced, x_te, y_te)
            rows.append(
                [
                    f"{ratio}×", "/".join(map(str, widths)), label, f"{macs:.2f}×",
                    f"{100 * acc:.2f}", f"{100 * (base_test - acc):.2f}", f"{seconds:.1f}",
                ]
            )  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["lenet5", "lenet5-search", "vgg"],
        default=["lenet5", "lenet5-search", "vgg"],
    )
    parser.add_argument("--mnist-dir", default=DEFAULT_MNIST)
    parser.add_argument(
        "--data-dir", default=FASHION_DIR, help="directory of the Fashion-MNIST IDX files"
    )
    parser.add_argument(
        "--vgg-checkpoint",
        default=None,
        help="trained small VGG weights (default: trained and cached per --vgg-epochs)",
    )
    parser.add_argument("--vgg-epochs", type=int, default=15)
    parser.add_argument("--lenet-epochs", type=int, default=2)
    parser.add_argument("--lenet-budget", type=float, default=1.84, help="points")
    parser.add_argument(
        "--lenet-joint", nargs="*", default=["greedy"],
        help="joint strategies of the callback-style LeNet-5 search (none: skip it)",
    )  # fmt: skip
    parser.add_argument(
        "--lenet-ranks", default="auto", help="the rank grid of the callback-style LeNet-5 search"
    )
    parser.add_argument(
        "--lenet-search-samples", type=int, default=10000,
        help="training images for the statistics of the callback-style LeNet-5 search",
    )  # fmt: skip
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument(
        "--allocations",
        nargs="+",
        choices=["uniform", "proxy"],
        default=["uniform", "proxy"],
        help="how the small VGG's widths are chosen at each conv-MAC ratio",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with_tp = tp is not None
    started = time.perf_counter()
    print(f"Machine: {machine_description()}\n")
    if not with_tp:
        print("Note: torch_pruning is not installed; its rows are skipped "
              "(pip install --no-deps torch-pruning==1.6.1).\n")  # fmt: skip
    sections = []
    if "vgg" in args.models:  # check the data first: the error comes before any training
        load_fashion_mnist(args.data_dir)
    if "lenet5" in args.models:
        sections.append(lenet(args, with_tp))
    if "lenet5-search" in args.models:
        sections.append(lenet_search(args))
    if "vgg" in args.models:
        sections.append(vgg(args, with_tp))
    print()
    print("\n".join(sections))
    print(f"Total: {time.perf_counter() - started:.0f} s on {machine_description()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
