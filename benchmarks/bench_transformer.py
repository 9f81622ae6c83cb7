"""Sweep time of a 6-layer transformer encoder's FFN blocks on CPU, with same-run baselines.

The model is :class:`~lightning_neuronprune.testing.models.PatchTransformer` (MNIST 4×4 patches as
49
tokens, blank patches as padding) with 6 blocks, dim 64 and FFN width 256, randomly initialised
(the timings do not depend on training). Batches are dicts with ``pixel_values``,
``attention_mask`` and ``labels``; the FFN activations are (batch × tokens × features).

Figures, each with its baseline from the same run:

* probe: the seconds to find the 6 FFN junctions with ``auto_junctions`` (probe on 8 images).
* statistics: ``collect_statistics`` of the 6 FFN consumers (padding masked out) against a plain
  forward pass over the same batches.
* 3-D vs 2-D: ``JunctionStatistics.update`` on masked (B, T, n) activations against the same real
  tokens as one (K, n) matrix; ``GatheredLinear`` on (B, T, n) against (B·T, n).
* sweep: one FFN junction, a fixed grid, with the cached evaluation (fx split: only the part from
  the consumer on runs for each p) against full forward passes per p (``cache=False``: what an
  untraceable model gets); then all 6 FFN junctions, cached.

    python benchmarks/bench_transformer.py --data-dir ../shared/data/mnist
    python benchmarks/bench_transformer.py --synthetic        # random images, no data needed
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from common import DEFAULT_MNIST, mnist_tensors
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import EnergyModel, GatheredLinear, collect_statistics
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.sweep import sweep_junction
from lightning_neuronprune.structure.discovery import auto_junctions
from lightning_neuronprune.testing.models import PatchTransformer, patch_mask


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"pixel_values": x[i : i + size], "attention_mask": patch_mask(x[i : i + size]),
         "labels": y[i : i + size]}
        for i in range(0, len(x), size)
    ]  # fmt: skip


def _best(fn: Callable[[], Any], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _pair(f: Callable[[], Any], g: Callable[[], Any], repeat: int = 20) -> tuple[float, float]:
    """Best times of ``f`` and ``g``, run alternately (fair on a shared, noisy machine)."""
    tf, tg = [], []
    for _ in range(repeat):
        tf.append(_best(f, 1))
        tg.append(_best(g, 1))
    return min(tf), min(tg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_MNIST)
    parser.add_argument("--synthetic", action="store_true", help="random images instead of MNIST")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--stats-size", type=int, default=2000, help="images for statistics")
    parser.add_argument("--eval-size", type=int, default=1000, help="images for evaluation")
    parser.add_argument("--points", type=int, default=8, help="grid points per junction")
    args = parser.parse_args()

    torch.manual_seed(0)
    n_images = args.stats_size + args.eval_size
    if args.synthetic:
        x = torch.randn(n_images, 1, 28, 28).clamp_min(-0.4)
        y = torch.randint(0, 10, (n_images,))
    else:
        x, y = mnist_tensors(args.data_dir)["train"]
        x, y = x[:n_images], y[:n_images]
    train = _batches(x[: args.stats_size], y[: args.stats_size], 250)
    evaluation = _batches(x[args.stats_size :], y[args.stats_size :], 250)
    model = PatchTransformer(depth=args.depth).eval()
    example = {k: v[:1] for k, v in evaluation[0].items() if k != "labels"}
    real = sum(int(b["attention_mask"].sum()) for b in train)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.depth} blocks, "
          f"dim 64, FFN 256; {real} real of {49 * args.stats_size} tokens "
          f"({real / (49 * args.stats_size):.0%})")  # fmt: skip

    t0 = time.perf_counter()
    probe_batch = {k: v[:8] for k, v in train[0].items() if k != "labels"}
    junctions = auto_junctions(model, example=probe_batch)
    probe_s = time.perf_counter() - t0
    forward_s = _best(lambda: model(probe_batch))
    print(f"probe: {len(junctions)} FFN junctions found in {probe_s:.2f}s "
          f"= {probe_s / forward_s:.0f} forward passes of the probe batch "
          f"({forward_s * 1e3:.1f} ms each)")  # fmt: skip
    assert [j.consumer for j in junctions] == [f"blocks.{i}.mlp.fc2" for i in range(args.depth)], (
        junctions
    )

    consumers = [j.consumer for j in junctions]
    with torch.no_grad():
        plain = _best(lambda: [model(b) for b in train], repeat=2)
    stats_s = _best(lambda: collect_statistics(model, consumers, train), repeat=2)
    stats = collect_statistics(model, consumers, train)
    print(f"statistics of {len(consumers)} FFN inputs over {args.stats_size} images: "
          f"{stats_s:.2f}s; plain forward {plain:.2f}s (ratio {stats_s / plain:.2f})")  # fmt: skip

    acts: list[torch.Tensor] = []
    handle = model.get_submodule(consumers[0]).register_forward_pre_hook(
        lambda m, a: acts.append(a[0].detach())
    )
    with torch.no_grad():
        model(train[0])
    handle.remove()
    X3, mask = acts[0], train[0]["attention_mask"]
    X2 = X3[mask.bool()].contiguous()

    def update3() -> None:
        JunctionStatistics.zeros(256).update(X3[mask.bool()])

    def update2() -> None:
        JunctionStatistics.zeros(256).update(X2)

    t3, t2 = _pair(update3, update2)
    print(f"G update, masked (B={X3.shape[0]}, T={X3.shape[1]}, n=256): {t3 * 1e3:.2f} ms; "
          f"same {X2.shape[0]} tokens as 2-D: {t2 * 1e3:.2f} ms (ratio {t3 / t2:.2f})")  # fmt: skip
    gl = GatheredLinear(torch.arange(0, 256, 2), 64)
    flat = X3.reshape(-1, 256).contiguous()
    with torch.no_grad():
        g3, g2 = _pair(lambda: gl(X3), lambda: gl(flat))
    print(f"GatheredLinear (p=128) on 3-D: {g3 * 1e3:.2f} ms; on 2-D: {g2 * 1e3:.2f} ms "
          f"(ratio {g3 / g2:.2f})")  # fmt: skip

    grid = [round(256 * k / args.points) for k in range(args.points, 0, -1)]
    energy = EnergyModel()
    print(f"sweep of one FFN junction, {len(grid) - 1} reduced widths, {args.eval_size} images:")
    for j in (junctions[0], junctions[-1]):
        times = {}
        for cache in (False, True):
            t0 = time.perf_counter()
            ev = CachedEvaluator(model, j.consumer, evaluation, MulticlassAccuracy(10), cache=cache)
            sweep_junction(model, j, stats[j.consumer], ev, energy, example, ranks=grid)
            times[cache] = time.perf_counter() - t0
            assert ev.cached == cache
        print(f"  {j.producer:<16} full forward per p {times[False]:6.2f}s, cached "
              f"{times[True]:6.2f}s ({times[False] / times[True]:.2f}x)")  # fmt: skip
    t0 = time.perf_counter()
    for j in junctions:
        ev = CachedEvaluator(model, j.consumer, evaluation, MulticlassAccuracy(10))
        sweep_junction(model, j, stats[j.consumer], ev, energy, example, ranks=grid)
    total = time.perf_counter() - t0
    print(f"all {len(junctions)} FFN junctions, cached: {total:.2f}s "
          f"({total / len(junctions) / (len(grid)):.3f}s per evaluated point)")  # fmt: skip


if __name__ == "__main__":
    main()
