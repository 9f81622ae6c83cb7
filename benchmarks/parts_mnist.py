"""Part ``mnist`` of bench_sweep.py: the project's sweep against the straightforward Algorithm 1.

For each row (default: LeNet5-FC2 with every p, as in the paper, and LeNet300-100-FC2 with the
package's ``"auto"`` grid), on the same trained network, the same K = 60000 training images, the
same 10000 test images and the same rank grid, ``sweeps.project_sweep`` (methods ``svd_qr``, the
paper's, and ``qr``) and ``sweeps.straightforward_sweep``: time and peak memory per phase, whether
the kept sets agree (and how close to a tie they are where not), and the speed-up.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
from typing import Any

import torch
from meters import PHASES, Meter, memory_row, phase_row, progress, without_statistics
from report import Report, md_table
from sweeps import np, project_sweep, scipy_linalg, straightforward_sweep, tie_gap
from torch import nn

#: Default MNIST rows: (paper name, architecture, target, rank grid).
ROWS = {
    "LeNet5-FC2": ("lenet5", "net.fc2:in", "all"),
    "LeNet5-FC1": ("lenet5", "net.fc1:in", "auto"),
    "LeNet300-100-FC1": ("lenet300100", "net.fc1:in", "auto"),
    "LeNet300-100-FC2": ("lenet300100", "net.fc2:in", "auto"),
    "LeNet300-100-FC3": ("lenet300100", "net.fc3:in", "all"),
}


def _load_mnist_model(arch: str, args: argparse.Namespace) -> nn.Module:
    from common import trained

    if args.tiny:
        return trained(arch, args.data_dir, epochs=1, limit_train=2000, cache=False).eval()
    return trained(arch, args.data_dir, epochs=args.epochs).eval()


def part_mnist(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    from common import loader, mnist_tensors
    from torchmetrics.classification import MulticlassAccuracy

    data = mnist_tensors(args.data_dir)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"][0][: args.eval_size], data["test"][1][: args.eval_size]
    samples = min(args.stats_samples, len(x_train))
    train_loader = loader(x_train, y_train)
    eval_loader = loader(x_test, y_test)
    eval_device = [(x.to(device), y.to(device)) for x, y in eval_loader]
    example = x_test[:1].to(device)
    have_baseline = np is not None and scipy_linalg is not None and not args.skip_straightforward
    if not have_baseline:
        why = "--skip-straightforward" if args.skip_straightforward else "numpy/scipy missing"
        report.add(f"(straightforward Algorithm 1 skipped: {why})")

    def project(
        name: str,
        model: nn.Module,
        target: str,
        metric: Any,
        ranks: Any,
        method: str,
        profile: cProfile.Profile | None = None,
    ) -> tuple[Meter, list[Any]]:
        progress(f"{name}: project sweep, {method}")
        return project_sweep(
            model, target, train_loader, samples, eval_loader, metric, example, ranks, method,
            device, profile,
        )  # fmt: skip

    time_rows, mem_rows, agree_rows = [], [], []
    models: dict[str, nn.Module] = {}
    for name in args.rows:
        arch, target, ranks = ROWS[name]
        if arch not in models:
            models[arch] = _load_mnist_model(arch, args).to(device)
        model = models[arch]
        metric = MulticlassAccuracy(num_classes=10, average="micro").to(device)
        profile = cProfile.Profile() if args.profile and name == args.rows[0] else None
        gc.collect()
        meter_p, points = project(name, model, target, metric, ranks, "svd_qr", profile)
        meter_q, points_q = project(name, model, target, metric, ranks, "qr")
        pts = {pt.p: pt for pt in points[1:]}
        for method, meter, npoints in (
            ("svd_qr", meter_p, len(pts)),
            ("qr", meter_q, len(points_q) - 1),
        ):
            time_rows.append(phase_row(f"{name} project {method}", meter, npoints))
            mem_rows.append(memory_row(f"{name} project {method}", meter))
        row_data: dict[str, Any] = {
            "project_svd_qr": dict(meter_p.seconds),
            "project_qr": dict(meter_q.seconds),
            "project_total": meter_p.total,
            "project_qr_total": meter_q.total,
        }
        if profile is not None:
            report.data.setdefault("profiles", {})[name] = _profile_text(profile, args.profile)
        if have_baseline:
            gc.collect()
            progress(f"{name}: straightforward Algorithm 1")
            meter_s, res, rank = straightforward_sweep(
                model, target, train_loader, samples, eval_device, example, ranks, device
            )
            extra = meter_s.__dict__.pop("extra")
            time_rows.append(phase_row(f"{name} straightforward", meter_s, len(res)))
            mem_rows.append(memory_row(f"{name} straightforward", meter_s))
            same = [p for p in res if p in pts and pts[p].kept == res[p]["kept"]]
            differ = [p for p in res if p in pts and pts[p].kept != res[p]["kept"]]
            missing = sorted(set(res) ^ set(pts))
            gaps = [tie_gap(extra["U"], p, res[p]["kept"], pts[p].kept) for p in differ]
            s = extra["s"]
            sgaps = [float((s[p - 1] - s[p]) / s[p - 1]) if p < len(s) else 1.0 for p in differ]
            dacc = max(
                (abs(pts[p].accuracy - res[p]["accuracy"]) for p in res if p in pts), default=0.0
            )
            dacc_same = max((abs(pts[p].accuracy - res[p]["accuracy"]) for p in same), default=0.0)
            speed = meter_s.total / meter_p.total
            agree_rows.append(
                [
                    name,
                    f"{len(same)}/{len(res)}",
                    ", ".join(
                        f"p={p} (pivot gap {g:.1e}, σ gap {sg:.1e})"
                        for p, g, sg in zip(differ, gaps, sgaps, strict=True)
                    )
                    or "—",
                    f"{100 * dacc:.2f}",
                    f"{100 * dacc_same:.2f}",
                    "—" if not missing else str(missing[:8]),
                    f"{speed:.1f}x",
                    f"{without_statistics(meter_s) / without_statistics(meter_p):.1f}x",
                    f"{meter_s.total / meter_q.total:.1f}x",
                ]
            )
            row_data.update(
                {
                    "straightforward": dict(meter_s.seconds),
                    "straightforward_total": meter_s.total,
                    "speedup": speed,
                    "speedup_without_statistics": without_statistics(meter_s)
                    / without_statistics(meter_p),
                    "same_kept": len(same),
                    "points": len(res),
                    "differ": differ,
                    "pivot_gaps": gaps,
                    "max_abs_accuracy_difference": dacc,
                    "rank": rank,
                }
            )
            del extra
        report.data.setdefault("mnist", {})[name] = row_data

    report.add(
        f"#### Wall time per phase, seconds (K = {samples} training images, "
        f"{len(x_test)} evaluation images, device {device})\n\n"
        + md_table(["run", "points", *PHASES, "total"], time_rows)
    )
    report.add(
        "#### Peak extra memory per phase, MiB (RSS above the start of the run"
        + (" / numpy's peak under tracemalloc for the straightforward one" if have_baseline else "")
        + (" / CUDA max allocated" if device.type == "cuda" else "")
        + ")\n\nThe RSS figure of a phase includes what earlier phases of the same run still "
        "hold (statistics, caches) and what the allocator kept; the numpy figure counts numpy's "
        "live buffers only.\n\n" + md_table(["run", *PHASES[:-1]], mem_rows)
    )
    if agree_rows:
        report.add(
            "#### Agreement and speed-up\n\n"
            "Same kept set: p where both chose the same features. For the others, the pivot gap "
            "is the relative partial-norm gap at the first disagreement (float64, geqp3 order; "
            "round-off level means a tie) and the σ gap is (σ_p − σ_{p+1}) / σ_p of X. "
            "Speed-up: straightforward end-to-end time / the project's end-to-end time, both "
            'with the paper\'s svd_qr; "without statistics" leaves out the shared forward '
            'pass over the K training images; "(qr)" divides the same straightforward time '
            "by the project's sweep with method qr (a different selection rule).\n\n"
            + md_table(
                [
                    "row",
                    "same kept set",
                    "differing p",
                    "max abs Δacc %",
                    "max abs Δacc % where sets agree",
                    "grid difference",
                    "speed-up (svd_qr)",
                    "without statistics",
                    "speed-up (qr)",
                ],
                agree_rows,
            )
        )
    target = report.data.get("mnist", {}).get("LeNet5-FC2", {})
    if "speedup" in target:
        # identical curves: the accuracies differ by less than half an image (float round-off)
        same = target["max_abs_accuracy_difference"] < 0.5 / args.eval_size
        met = target["speedup"] >= 20 and same
        report.add(
            f"**Target** (project ≥ 20x faster end to end than the straightforward Algorithm 1 on "
            f"the every-p LeNet5-FC2 sweep, identical accuracy curves): "
            f"{'met' if met else 'NOT met'}: {target['speedup']:.1f}x, kept sets identical at "
            f"{target['same_kept']}/{target['points']} p, largest accuracy difference "
            f"{100 * target['max_abs_accuracy_difference']:.2f} points."
        )
    for name, text in report.data.get("profiles", {}).items():
        report.add(f"#### cProfile of the project's svd_qr sweep, {name}\n\n```\n{text}\n```")


def _profile_text(profile: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
    return "\n".join(lines[start:])
