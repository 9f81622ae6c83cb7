"""Parts ``scale``, ``grid``, ``qr`` and ``memory`` of bench_sweep.py, on random problems.

* ``scale``: a CaffeNet-sized classifier (9216→4096→4096→1000, random weights), statistics of
  fc6's 4096 neurons from 50000 random inputs streamed in batches, a 64-point rank grid, methods
  ``svd_qr`` and ``qr``: time and peak memory per phase; the peak must be O(n²), never O(n·K).
* ``grid``: a 2048-wide layer's svd_qr sweep against LAPACK geqp3 alone on the same grid.
* ``qr``: ``pivoted_qr`` on the device vs ``scipy.linalg.qr(pivoting=True)`` (geqp3) on the host,
  ``A = U_pᵀ``.
* ``memory``: the transient memory of each package function of a sweep step, and the sweep's
  peak against K (each K in a fresh process: ``bench_sweep.py --memory-child K``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from meters import PHASES, PeakProbe, mb, memory_row, phase_row, progress
from random_models import RandomBatches, even_grid, random_problem
from report import Report, md_table
from sweeps import np, project_sweep, scipy_linalg

SCRIPT = Path(__file__).resolve().parent / "bench_sweep.py"


def part_scale(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    from torchmetrics.classification import MulticlassAccuracy

    dims = (256, 128, 128, 100) if args.tiny else (9216, 4096, 4096, 1000)
    n, K = dims[1], args.scale_samples
    model, eval_data, example, grid = random_problem(
        dims, device, args.scale_eval, 1000, args.scale_points
    )
    rows, mem_rows = [], []
    for method in args.scale_methods:
        gc.collect()
        metric = MulticlassAccuracy(num_classes=dims[3], average="micro").to(device)
        train = RandomBatches(K, dims[0], args.scale_batch, seed=0, device=device)
        progress(f"scale: project sweep, {method}")
        meter, points = project_sweep(
            model, "fc6", train, K, eval_data, metric, example, grid, method, device
        )
        peak = max([*meter.peak_rss.values(), meter.peak_hwm or 0])
        rows.append(phase_row(f"{method}", meter, len(points) - 1))
        mem_rows.append(memory_row(f"{method}", meter) + [mb(peak)])
        half = min(points[1:], key=lambda pt: abs(pt.p - n // 2))
        report.data.setdefault("scale", {})[method] = {
            "seconds": dict(meter.seconds),
            "total": meter.total,
            "peak_rss": peak,
            "peak_cuda": dict(meter.peak_cuda),
            "agreement_at_half": half.accuracy,
        }
    report.add(
        f"#### CaffeNet-sized classifier {dims[0]}→{dims[1]}→{dims[2]}→{dims[3]} (random "
        f"weights), fc6's n = {n} neurons, K = {K} random inputs in batches of "
        f"{args.scale_batch}, {len(grid)}-point rank grid, {args.scale_eval} evaluation inputs, "
        f"device {device}\n\nSeconds per phase:\n\n"
        + md_table(["method", "points", *PHASES, "total"], rows)
        + "\n\nPeak extra RSS per phase (sampled every 2 ms) and for the whole run (the "
        "kernel's VmHWM, reset when the sweep starts), MiB above the RSS at its start ("
        + ("/ CUDA max allocated, " if device.type == "cuda" else "")
        + f"the n × K float64 matrix would take {mb(8 * n * K)} "
        f"MiB; G = n × n float64 takes {mb(8 * n * n)} MiB; the float32 weights take "
        f"{mb(4 * sum(p.numel() for p in model.parameters()))} MiB and are not counted):\n\n"
        + md_table(["method", *PHASES[:-1], "whole run (VmHWM)"], mem_rows)
    )


def part_grid(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """A 2048-wide layer's svd_qr sweep (64 points, K = 20000) vs geqp3 alone on the same grid.

    The sweep runs end to end (statistics, eigendecomposition, the grid's selection, least
    squares, evaluation and energy of every point). The baseline is only LAPACK geqp3 (scipy) of
    ``U_pᵀ`` for every p of the same grid, with ``U`` from the sweep's own statistics; the kept
    sets must be the same at every grid point (then so is the accuracy curve).
    """
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_neuronprune.core.selection import spectrum

    if scipy_linalg is None:
        report.add("(part grid skipped: scipy missing)")
        return
    n = 256 if args.tiny else args.grid_n
    dims = (2 * n, n, n, 100)
    K = 2000 if args.tiny else args.grid_samples
    model, eval_data, example, grid = random_problem(
        dims, device, 500 if args.tiny else 2000, 500, args.scale_points
    )
    metric = MulticlassAccuracy(num_classes=dims[3], average="micro").to(device)
    train = RandomBatches(K, dims[0], args.scale_batch, seed=0, device=device)
    progress(f"grid: project sweep, n = {n}, {len(grid)} points, K = {K}")
    meter, points = project_sweep(
        model, "fc6", train, K, eval_data, metric, example, grid, "svd_qr", device
    )
    progress("grid: geqp3 of every U_pᵀ")
    from lightning_neuronprune import collect_statistics

    stats = collect_statistics(model, ["fc7"], train, max_samples=K, device=device)["fc7"]
    U = spectrum(stats)[1].cpu().numpy()
    ps = [pt.p for pt in points[1:]]
    t0 = time.perf_counter()
    ref = {
        p: scipy_linalg.qr(np.ascontiguousarray(U[:, :p].T), mode="r", pivoting=True)[1][:p]
        for p in ps
    }
    t_ref = time.perf_counter() - t0
    same = sum(sorted(ref[pt.p].tolist()) == list(pt.kept) for pt in points[1:])
    report.data["grid"] = {
        "n": n, "K": K, "points": len(ps), "sweep_seconds": meter.total,
        "seconds": dict(meter.seconds), "geqp3_seconds": t_ref, "same_kept": same,
        "peak_rss": meter.peak_hwm,
    }  # fmt: skip
    report.add(
        f"#### svd_qr sweep of a {n}-wide layer ({dims[0]}→{n}→{n}→{dims[3]}, random weights), "
        f"{len(ps)}-point grid, K = {K}, device {device}, against LAPACK geqp3 alone\n\n"
        + md_table(
            ["sweep end to end [s]", *PHASES, f"geqp3 × {len(ps)} [s]", "ratio", "same kept sets"],
            [
                [
                    f"{meter.total:.2f}",
                    *(f"{meter.seconds.get(k, 0.0):.2f}" for k in PHASES),
                    f"{t_ref:.2f}",
                    f"{meter.total / t_ref:.2f}x",
                    f"{same} of {len(ps)}",
                ]
            ],
        )
    )


def part_qr(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """``pivoted_qr`` on the device vs geqp3 on the host, for ``A = U_pᵀ`` (p = n / 2 rows)."""
    from lightning_neuronprune.core.linalg import pivoted_qr

    rows = []

    def best(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
        out, t_best = None, math.inf
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_best = min(t_best, time.perf_counter() - t0)
        return t_best, out

    sizes = [256] if args.tiny else [500, 4096]  # 500: LeNet5-FC2's layer; 4096: CaffeNet's fc6
    cases = [(n, dtype) for n in sizes for dtype in (torch.float32, torch.float64)]
    for n, dtype in cases:
        p = n // 2
        gen = torch.Generator().manual_seed(n)
        U = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))[0]
        A = U.T.contiguous().to(dtype)
        A_dev = A.to(device)
        pivoted_qr(A_dev, k=p)  # warm-up
        t_ours, (Q, R, perm) = best(lambda A_dev=A_dev, p=p: pivoted_qr(A_dev, k=p))
        err = (A_dev.double()[:, perm] - Q.double() @ R.double()).norm() / A_dev.double().norm()
        perm = perm.cpu()
        name = str(dtype).replace("torch.", "")
        if scipy_linalg is None:
            rows.append(
                [
                    name,
                    f"{p}x{n}",
                    "scipy missing",
                    f"{t_ours:.3f} ({device})",
                    "—",
                    f"{err:.1e}",
                    "—",
                ]
            )
            continue
        A_np = A.numpy()
        t_ref, ref = best(lambda A_np=A_np: scipy_linalg.qr(A_np, mode="economic", pivoting=True))
        same_set = sorted(perm[:p].tolist()) == sorted(ref[2][:p].tolist())
        try:
            from bench_linalg import _pivot_agreement

            agree = _pivot_agreement(A_np, perm.numpy(), ref[2], p)
        except ImportError:  # pragma: no cover - bench_linalg.py is beside this file
            agree = "yes" if same_set else "no"
        rows.append(
            [
                name,
                f"{p}x{n}",
                f"{t_ref:.3f}",
                f"{t_ours:.3f} ({device})",
                f"{t_ours / t_ref:.2f}x",
                f"{err:.1e}",
                f"{agree}; same set: {same_set}",
            ]
        )
    report.data["qr"] = rows
    report.add(
        "#### pivoted_qr vs LAPACK geqp3, A = U_pᵀ (U_p: n × p orthonormal), k = p steps\n\n"
        'Best of 3. Same pivots: "yes", or the first differing position and the float64 '
        "partial-norm gap between the two candidates there (round-off level = a near-tie, after "
        "which the later pivots legitimately differ).\n\n"
        + md_table(
            [
                "dtype",
                "shape",
                "scipy geqp3 on host s",
                "pivoted_qr s",
                "ours / geqp3",
                "‖AP−QR‖/‖A‖",
                "same pivots",
            ],
            rows,
        )
    )


def part_memory(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """Where the O(n²) memory goes, and that the sweep's peak does not grow with K.

    1. Each package function of a sweep step, alone, on statistics of n features (float64):
       time and transient peak RSS, in units of one n × n float64 matrix.
    2. The full project sweep (svd_qr) of a smaller classifier for several K: peak RSS per phase
       against n·K·8 bytes.
    """
    from lightning_neuronprune import JunctionStatistics
    from lightning_neuronprune.core.reconstruction import (
        least_squares_transform,
        reconstruct_consumer,
    )
    from lightning_neuronprune.core.selection import nested_order, select_neurons, spectrum

    n = 256 if args.tiny else args.memory_n
    nn_bytes = 8 * n * n
    gen = torch.Generator(device=device).manual_seed(0)
    stats = JunctionStatistics.zeros(n, device)
    for _ in range(max(2, (2 * n) // 1000 + 1)):
        stats.update(torch.randn(1000, n, generator=gen, device=device).relu_())
    W = torch.randn(n, n, generator=gen, device=device)
    probe = PeakProbe()
    rows = []
    try:
        U = None
        kept = None
        rec = None
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("JunctionStatistics.second_moment()", lambda: stats.second_moment()),
            ("selection.spectrum (eigh)", lambda: spectrum(stats)),
            (
                f"selection.select_neurons svd_qr, p = {n // 2}",
                lambda: select_neurons(stats, n // 2, basis=U),
            ),
            ("selection.nested_order (pivoted Cholesky)", lambda: nested_order(stats)),
            (
                f"reconstruction.least_squares_transform, p = {n // 2}",
                lambda: least_squares_transform(stats, kept),
            ),
            (
                f"reconstruction.reconstruct_consumer, m = {n}, p = {n // 2}",
                lambda: reconstruct_consumer(W, None, rec),
            ),
        ]
        for name, fn in steps:
            out, seconds, peak = probe.measure(fn)
            if name.startswith("selection.spectrum"):
                U = out[1]
            elif name.startswith("selection.select"):
                kept = out
            elif name.startswith("reconstruction.least"):
                rec = out
            rows.append([name, f"{seconds:.2f}", mb(peak), f"{peak / nn_bytes:.1f}"])
            del out
    finally:
        probe.close()
    report.add(
        f"#### Transient memory of each step, n = {n} (one n × n float64 matrix = "
        f"{mb(nn_bytes)} MiB), device {device}\n\n"
        + md_table(["function", "seconds", "peak extra RSS MiB", "in n × n float64 units"], rows)
    )

    dims = (256, 128, 128, 100) if args.tiny else tuple(args.memory_dims)
    n2 = dims[1]
    grid = even_grid(n2, 8)
    krows = []
    for K in args.memory_samples if not args.tiny else [1000, 4000]:
        progress(f"memory: K = {K} (fresh process)")
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--memory-child",
            str(K),
            "--device",
            str(device),
            "--memory-dims",
            *map(str, dims),
            "--scale-batch",
            str(args.scale_batch),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        child = json.loads(out.strip().splitlines()[-1])
        krows.append(
            [
                K,
                *(mb(child["peak"].get(k, 0)) for k in PHASES[:-1]),
                mb(child["hwm"]),
                mb(8 * n2 * K),
                f"{child['total']:.1f}",
            ]
        )
    report.add(
        f"#### Peak extra RSS of the project's sweep against K, classifier "
        f"{'→'.join(map(str, dims))}, fc6's n = {n2}, {len(grid)} points, svd_qr "
        f"(n × n float64 = {mb(8 * n2 * n2)} MiB)\n\n"
        "Each K runs in a fresh process (so no run reuses memory an earlier one freed). Per "
        'phase: sampled RSS above the level before the sweep; "whole run": the kernel\'s '
        "peak RSS (VmHWM, reset when the sweep starts) minus that level.\n\n"
        + md_table(["K", *PHASES[:-1], "whole run", "n·K float64 would be", "seconds"], krows)
    )


def memory_child(args: argparse.Namespace, device: torch.device) -> None:
    """One K of the memory part's scan, in its own process; prints one JSON line."""
    from torchmetrics.classification import MulticlassAccuracy

    dims = tuple(args.memory_dims)
    K = args.memory_child
    model, eval_data, example, grid = random_problem(dims, device, 1000, 1000, 8)
    metric = MulticlassAccuracy(num_classes=dims[3], average="micro").to(device)
    train = RandomBatches(K, dims[0], args.scale_batch, seed=0, device=device)
    meter, _ = project_sweep(
        model, "fc6", train, K, eval_data, metric, example, grid, "svd_qr", device
    )
    record = {"K": K, "hwm": meter.peak_hwm, "total": meter.total, "peak": meter.peak_rss}
    print(json.dumps(record))
