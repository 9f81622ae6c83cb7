"""``reproduce_paper.py --compare-methods``: the selection methods side by side, per paper row."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from paper_data import ARCH_LABELS, PAPER_ROWS, initial_grid, numerical_rank, smallest_within
from report import machine_description, md_table

METHOD_NAMES = ("svd_qr", "qr", "output")


def compare_methods(
    data: dict[str, Any], args: argparse.Namespace, log: Callable[[str], None]
) -> str:
    """``--compare-methods``: the three selection methods at every p of each row's grid.

    Same networks, statistics and test-set evaluation as the reproduction; Eq. 6 without
    intercept for every method. Returns the markdown section.
    """
    from common import accuracy, loader, trained
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_neuronprune import EnergyModel, collect_statistics, find_junction
    from lightning_neuronprune.search.sweep import CachedEvaluator, sweep_junction

    rows = [r for r in PAPER_ROWS if args.rows is None or r.name in args.rows]
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    if args.eval_size:
        x_test, y_test = x_test[: args.eval_size], y_test[: args.eval_size]
    table, curves_all, accuracies = [], {}, []
    for arch in ARCH_LABELS:
        arch_rows = [r for r in rows if r.arch == arch]
        if not arch_rows:
            continue
        torch.set_num_threads(args.default_threads)
        model = trained(arch, args.data_dir, epochs=1 if args.quick else args.epochs,
                        limit_train=2000 if args.quick else args.limit_train,
                        cache=not args.quick).eval()  # fmt: skip
        if args.threads:
            torch.set_num_threads(args.threads)
        consumers = sorted({find_junction(model, r.target).consumer for r in arch_rows})
        samples = min(args.stats_samples, len(x_train))
        stats_all = collect_statistics(
            model, consumers, loader(x_train, y_train), max_samples=samples
        )
        test_acc = accuracy(model, x_test, y_test)
        em = EnergyModel()
        example = x_test[:1]
        for row in arch_rows:
            t0 = time.perf_counter()
            j = find_junction(model, row.target)
            st = stats_all[j.consumer]
            ev = CachedEvaluator(
                model, j.consumer, loader(x_test, y_test), MulticlassAccuracy(10, average="micro")
            )
            base = (ev(), em.estimate(model, example))
            grid = initial_grid(numerical_rank(st), args.quick)
            curves = {}
            for method in METHOD_NAMES:
                pts = sweep_junction(
                    model, j, st, ev, em, example, ranks=grid, baseline=base, method=method
                )
                curves[method] = {pt.p: pt.accuracy for pt in pts if pt.p < j.num_features}
            threshold = base[0] - row.allowed_drop
            common_p = sorted(set.intersection(*(set(c) for c in curves.values())))
            small = [p for p in common_p if p <= 128]
            mean = {m: 100 * sum(curves[m][p] for p in small) / len(small) for m in curves}
            wins = sum(curves["output"][p] > curves["svd_qr"][p] + 1e-12 for p in common_p)
            losses = sum(curves["output"][p] < curves["svd_qr"][p] - 1e-12 for p in common_p)
            best_gap = max((100 * (curves["output"][p] - curves["svd_qr"][p]), p) for p in common_p)
            pmin = {m: smallest_within(curves[m], threshold) for m in curves}
            table.append([
                row.name, j.layer, f"{100 * row.allowed_drop:.2f}",
                *(str(pmin[m]) if pmin[m] is not None else "—" for m in METHOD_NAMES),
                *(f"{mean[m]:.2f}" for m in METHOD_NAMES),
                f"{wins} / {losses} / {len(common_p) - wins - losses}",
                f"+{best_gap[0]:.2f} at p={best_gap[1]}",
            ])  # fmt: skip
            curves_all[row.name] = {m: {str(p): a for p, a in c.items()} for m, c in curves.items()}
            log(f"  {row.name}: p within the paper's drop {pmin}, "
                f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
        log(f"{arch}: test accuracy {100 * test_acc:.2f}%")
        accuracies.append(f"{ARCH_LABELS[arch]} {100 * test_acc:.2f}%")
    if args.json:
        args.json.write_text(json.dumps(curves_all, indent=1))
    header = [
        "row", "junction", "paper drop (points)",
        *(f"smallest p, {m}" for m in METHOD_NAMES),
        *(f"mean acc. p ≤ 128, {m}" for m in METHOD_NAMES),
        "output vs svd_qr: better / worse / tied p", "largest gain",
    ]  # fmt: skip
    return "\n".join([
        "### Selection methods at every p: `svd_qr` (paper), `qr` (nested), `output` "
        "(output-aware)",
        "",
        f"{machine_description()}. Networks trained by `benchmarks/common.py`'s recipe (test "
        f"accuracy {', '.join(accuracies)}), statistics on {args.stats_samples} training "
        f"images; accuracy on {len(y_test)} test images; "
        "every p ≤ 128 and a coarse grid above, up to rank(X); Eq. 6 without intercept for "
        "all three. \"smallest p\": the fewest kept features whose accuracy drop is within the "
        "paper's own drop for that row.",
        "",
        md_table(header, table),
        "",
        "    python benchmarks/reproduce_paper.py --compare-methods --threads 1",
    ])  # fmt: skip
