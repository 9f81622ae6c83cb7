"""The project's rank sweep against a straightforward Algorithm 1, in one process run (issue 4).

**Part ``mnist``.** For each row (default: LeNet5-FC2 with every p, as in the paper, and
LeNet300-100-FC2 with the package's ``"auto"`` grid), on the same trained network, the same K =
60000 training images, the same 10000 test images and the same rank grid:

* *straightforward*: Algorithm 1 the way a careful reader of the paper writes it. The full n × K
  activation matrix ``X`` is kept in numpy (float64, the precision the package accumulates in);
  ``numpy.linalg.svd(X)``; for every p ``scipy.linalg.qr(U_pᵀ, pivoting=True)`` (LAPACK geqp3);
  Eq. 6 as written, ``T = X X_pᵀ (X_p X_pᵀ)⁻¹``, ``W_p = W T``; the reduced network is built
  (``copy.deepcopy`` plus new layers) and a full forward pass over the evaluation set gives the
  accuracy; the same ``EnergyModel`` prices it.
* *project*: ``collect_statistics`` (streamed ``G = X Xᵀ``), then ``sweep_junction`` with a
  ``CachedEvaluator`` (method ``svd_qr``, the paper's); ``qr`` is timed as well.

Phases are timed at their boundaries (one device synchronisation each): statistics; the
evaluation cache; selection (``JunctionFitter``: eigendecomposition or nested order, then the
whole grid's kept sets at once); sweep (``sweep_junction``: least squares, evaluation and energy
of every point, with one device read per block of points). The straightforward implementation
reports reconstruction, evaluation and energy separately.

**Part ``scale``.** A CaffeNet-sized classifier (9216→4096→4096→1000, random weights), statistics of
fc6's 4096 neurons from 50000 random inputs streamed in batches, a 64-point rank grid, methods
``svd_qr`` and ``qr``; the metric is top-1 agreement with the unreduced network on held-out random
inputs. Time and peak memory per phase; the peak must be O(n²), never O(n·K).

**Part ``qr``.** ``pivoted_qr`` on the device vs ``scipy.linalg.qr(pivoting=True)`` (geqp3) on the
host, float32, ``A = U_pᵀ`` with n = 4096, p = 2048.

**Memory.** A sampling thread reads the resident set size (``/proc/self/statm``) every 2 ms; the
figure per phase is the largest RSS seen while in that phase minus the RSS when the implementation
started (after ``gc.collect()``), i.e. the extra memory it needed. For the straightforward one,
``tracemalloc`` also gives the peak of numpy's own allocations (numpy reports its buffers to
tracemalloc; torch does not). On CUDA, ``torch.cuda.max_memory_allocated`` is reported too.

Examples::

    python benchmarks/bench_sweep.py --threads 1 --markdown docs/RESULTS.md
    python benchmarks/bench_sweep.py --tiny                 # CI: seconds
    python benchmarks/bench_sweep.py --device cuda --parts scale qr
"""

from __future__ import annotations

import os
import sys


def _blas_threads_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
    return None


if __name__ == "__main__" and _blas_threads_from_argv(sys.argv):
    # BLAS threads are fixed when numpy loads OpenBLAS, and `import torch` imports numpy.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _blas_threads_from_argv(sys.argv)

import argparse  # noqa: E402
import copy  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict, defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PHASES = (
    "statistics",
    "evaluation cache",
    "selection",
    "reconstruction",
    "evaluation",
    "energy",
    "sweep",
    "other",
)
"""Phases of both implementations: the project's sweep fills ``sweep`` (fits, evaluations and
energy of every point, unsynchronised inside), the straightforward one the three before it."""
#: Default MNIST rows: (paper name, architecture, target, rank grid).
ROWS = {
    "LeNet5-FC2": ("lenet5", "net.fc2:in", "all"),
    "LeNet5-FC1": ("lenet5", "net.fc1:in", "auto"),
    "LeNet300-100-FC1": ("lenet300100", "net.fc1:in", "auto"),
    "LeNet300-100-FC2": ("lenet300100", "net.fc2:in", "auto"),
    "LeNet300-100-FC3": ("lenet300100", "net.fc3:in", "all"),
}


def _optional(name: str) -> Any:
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


np = _optional("numpy")
scipy_linalg = _optional("scipy.linalg")


# --------------------------------------------------------------------------------------------
# measurement


def _rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import psutil

        return psutil.Process().memory_info().rss


def _reset_vm_hwm() -> None:
    """Reset the kernel's peak RSS (``VmHWM``) to the current RSS (Linux >= 4.0; else no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _vm_hwm() -> int:
    """Peak resident set size of this process (``VmHWM``), bytes; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Meter:
    """Wall time and peak memory per phase for one implementation (see the module docstring)."""

    def __init__(self, device: torch.device, trace_numpy: bool = False, interval: float = 0.002):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_rss: dict[str, int] = defaultdict(int)
        self.peak_numpy: dict[str, int] = defaultdict(int)
        self.peak_cuda: dict[str, int] = defaultdict(int)
        self.trace_numpy = trace_numpy
        self.interval = interval
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._started = 0.0
        self.peak_hwm: int | None = None
        self.total = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            phase = self._phase
            if phase is not None:
                extra = _rss() - self._base
                if extra > self.peak_rss[phase]:
                    self.peak_rss[phase] = extra

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Meter:
        gc.collect()
        if self.trace_numpy:
            import tracemalloc

            tracemalloc.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        _reset_vm_hwm()
        self._base = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.total = time.perf_counter() - self._started
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        hwm = _vm_hwm()
        self.peak_hwm = hwm - self._base if hwm else None
        if self.trace_numpy:
            import tracemalloc

            tracemalloc.stop()
        self.seconds["other"] = max(0.0, self.total - sum(self.seconds.values()))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (nested calls count once, in the outer phase)."""
        if self._phase is not None:
            yield
            return
        self._sync()
        if self.trace_numpy:
            import tracemalloc

            tracemalloc.reset_peak()
            numpy_base = tracemalloc.get_traced_memory()[0]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            cuda_base = torch.cuda.memory_allocated(self.device)
        self._phase = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            extra = _rss() - self._base
            self.peak_rss[name] = max(self.peak_rss[name], extra)
            self._phase = None
            if self.trace_numpy:
                import tracemalloc

                peak = tracemalloc.get_traced_memory()[1] - numpy_base
                self.peak_numpy[name] = max(self.peak_numpy[name], peak)
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) - cuda_base
                self.peak_cuda[name] = max(self.peak_cuda[name], peak)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapper


_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _mb(x: int | float | None) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


# --------------------------------------------------------------------------------------------
# the project's sweep, instrumented


def project_sweep(
    model: nn.Module,
    target: str,
    train_data: Any,
    samples: int,
    eval_data: Any,
    metric: Any,
    example: Tensor,
    ranks: Any,
    method: str,
    device: torch.device,
    profile: cProfile.Profile | None = None,
) -> tuple[Meter, list[Any]]:
    """statistics → CachedEvaluator → selection (JunctionFitter) → sweep_junction, per phase.

    Phases are timed at their boundaries only (one device synchronisation each), so the sweep
    runs as it does in the callback: "sweep" is the least-squares fits, the evaluations and the
    energy model of every grid point together.
    """
    from lightning_neuronprune import EnergyModel, collect_statistics, find_junction
    from lightning_neuronprune.fitting import FitOptions, JunctionFitter
    from lightning_neuronprune.sweep import CachedEvaluator, rank_grid, sweep_junction

    junction = find_junction(model, target)
    consumer = model.get_submodule(junction.consumer)
    meter = Meter(device)
    with meter:
        if profile is not None:
            profile.enable()
        with meter.phase("statistics"):
            stats = collect_statistics(
                model, [junction.consumer], train_data, max_samples=samples, device=device
            )[junction.consumer]
        with meter.phase("evaluation cache"):
            evaluator = CachedEvaluator(model, junction.consumer, eval_data, metric, device=device)
        with meter.phase("selection"):
            fitter = JunctionFitter(
                stats, consumer.weight, consumer.bias, FitOptions(method=method)
            )
            n = junction.num_features
            fitter.prepare([p for p in rank_grid(n, ranks, start=fitter.rank) if p < n])
        with meter.phase("sweep"):
            points = sweep_junction(
                model, junction, stats, evaluator, EnergyModel(), example,
                ranks=ranks, method=method, fitter=fitter,
            )  # fmt: skip
        if profile is not None:
            profile.disable()
    return meter, points


# --------------------------------------------------------------------------------------------
# the straightforward Algorithm 1


class _Gather(nn.Module):
    """Keeps the input features ``index`` (the reduced network's gather in front of a layer)."""

    def __init__(self, index: Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, x: Tensor) -> Tensor:
        return x[..., self.index]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def straightforward_sweep(
    model: nn.Module,
    target: str,
    train_data: Any,
    samples: int,
    eval_data: list[tuple[Tensor, Tensor]],
    example: Tensor,
    ranks: Any,
    device: torch.device,
) -> tuple[Meter, dict[int, dict[str, Any]], int]:
    """Algorithm 1 with the full n × K activation matrix in numpy (see the module docstring).

    The junction (producer, consumer) is looked up with ``find_junction`` and the grid with
    ``rank_grid``, so that both implementations use the same layers and the same p; everything
    else is numpy/scipy and plain torch modules.
    """
    from lightning_neuronprune import EnergyModel, find_junction
    from lightning_neuronprune.sweep import rank_grid

    junction = find_junction(model, target)
    consumer = model.get_submodule(junction.consumer)
    producer = model.get_submodule(junction.producer) if junction.producer else None
    n, m = junction.num_features, consumer.out_features
    W = consumer.weight.detach().cpu().double().numpy()
    b = consumer.bias.detach().cpu() if consumer.bias is not None else None
    energy_model = EnergyModel()
    meter = Meter(device, trace_numpy=True)
    results: dict[int, dict[str, Any]] = {}
    with meter:
        with meter.phase("statistics"):
            X = np.empty((n, samples))  # float64, n × K
            filled = 0

            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                nonlocal filled
                x = args[0].detach().reshape(-1, n)
                X[:, filled : filled + x.shape[0]] = x.T.cpu().numpy()
                filled += x.shape[0]

            handle = consumer.register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    for x, _ in train_data:
                        x = x[: samples - filled]
                        if x.shape[0] == 0:
                            break
                        model(x.to(device))
            finally:
                handle.remove()
            X = X[:, :filled]
        with meter.phase("selection"):
            U, s, _ = np.linalg.svd(X, full_matrices=False)
            rank = int((s > n * np.finfo(np.float32).eps * s[0]).sum()) if s[0] > 0 else 1
        grid = [p for p in rank_grid(n, ranks, start=rank) if p != n]
        for p in grid:
            with meter.phase("selection"):
                _, _, piv = scipy_linalg.qr(U[:, :p].T, pivoting=True, mode="economic")
                S = np.sort(piv[:p])
            with meter.phase("reconstruction"):
                X_p = X[S]
                A = X_p @ X_p.T  # X_p X_pᵀ (p × p)
                B = X @ X_p.T  # X X_pᵀ (n × p)
                try:
                    T = np.linalg.solve(A, B.T).T  # B A⁻¹, A symmetric
                except np.linalg.LinAlgError:
                    T = B @ np.linalg.pinv(A, hermitian=True)
                W_p = torch.from_numpy(W @ T).float()
            with meter.phase("evaluation"):
                reduced = copy.deepcopy(model)
                index = torch.from_numpy(S).to(device)
                new = nn.Linear(p, m, bias=b is not None).to(device)
                with torch.no_grad():
                    new.weight.copy_(W_p)
                    if b is not None:
                        new.bias.copy_(b)
                if producer is not None:
                    prod = nn.Linear(producer.in_features, p, bias=producer.bias is not None)
                    prod = prod.to(device)
                    with torch.no_grad():
                        prod.weight.copy_(producer.weight[index])
                        if producer.bias is not None:
                            prod.bias.copy_(producer.bias[index])
                    _set_module(reduced, junction.producer, prod)
                    _set_module(reduced, junction.consumer, new)
                else:
                    _set_module(reduced, junction.consumer, nn.Sequential(_Gather(index), new))
                reduced.eval()
                correct = total = 0
                with torch.no_grad():
                    for x, y in eval_data:
                        correct += int((reduced(x).argmax(-1) == y).sum())
                        total += y.numel()
            with meter.phase("energy"):
                energy = energy_model.estimate(reduced, example)
            results[p] = {
                "kept": tuple(int(i) for i in S),
                "accuracy": correct / total,
                "energy": energy.total,
            }
        meter.extra = {"U": U, "s": s}  # for the tie diagnostics, dropped afterwards
    return meter, results, rank


def tie_gap(U: Any, p: int, kept_ref: tuple[int, ...], kept_other: tuple[int, ...]) -> float:
    """How close to a tie the first disagreement between two kept sets is.

    Pivoted QR of ``M = U_pᵀ`` in ``kept_ref``'s pivot order (geqp3 on ``M``, float64): at the
    first pivot that the other set lacks, the relative gap between its partial norm and the largest
    partial norm among the other set's remaining columns. A gap at round-off level is a tie.
    """
    M = U[:, :p].T
    _, _, piv = scipy_linalg.qr(M, pivoting=True, mode="economic")
    other = set(kept_other)
    chosen: list[int] = []
    for j in piv[:p]:
        if j not in other:
            rest = [c for c in kept_other if c not in chosen]
            Q = np.linalg.qr(M[:, chosen])[0] if chosen else np.zeros((M.shape[0], 0))
            R = M - Q @ (Q.T @ M)
            nu = np.linalg.norm(R, axis=0)
            return float((nu[j] - nu[rest].max()) / nu[j]) if nu[j] > 0 else 0.0
        chosen.append(int(j))
    return 0.0


# --------------------------------------------------------------------------------------------
# parts


@dataclass
class Report:
    """What one run prints and writes (the markdown section is rewritten after every table, so a
    run stopped by a time limit keeps what it measured)."""

    markdown: Path | None = None
    section: str = "bench_sweep"
    sections: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.sections.append(text)
        if self.markdown is not None:
            from reproduce_paper import write_section

            write_section(self.markdown, self.section, "\n\n".join(self.sections), "bench_sweep.py")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _without_stats(meter: Meter) -> float:
    return meter.total - meter.seconds.get("statistics", 0.0)


def _phase_rows(label: str, meter: Meter, npoints: int) -> list[Any]:
    return [
        label,
        npoints,
        *(f"{meter.seconds.get(k, 0.0):.2f}" for k in PHASES),
        f"{meter.total:.2f}",
    ]


def _memory_rows(label: str, meter: Meter) -> list[Any]:
    cells = []
    for k in PHASES[:-1]:
        cell = _mb(meter.peak_rss.get(k, 0))
        if meter.trace_numpy:
            cell += f" / {_mb(meter.peak_numpy.get(k, 0))}"
        if meter.peak_cuda:
            cell += f" / {_mb(meter.peak_cuda.get(k, 0))} GPU"
        cells.append(cell)
    return [label, *cells]


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
        progress(f"{name}: project sweep, svd_qr")
        meter_p, points = project_sweep(
            model,
            target,
            train_loader,
            samples,
            eval_loader,
            metric,
            example,
            ranks,
            "svd_qr",
            device,
            profile,
        )
        pts = {pt.p: pt for pt in points[1:]}
        time_rows.append(_phase_rows(f"{name} project svd_qr", meter_p, len(pts)))
        mem_rows.append(_memory_rows(f"{name} project svd_qr", meter_p))
        progress(f"{name}: project sweep, qr")
        meter_q, points_q = project_sweep(
            model,
            target,
            train_loader,
            samples,
            eval_loader,
            metric,
            example,
            ranks,
            "qr",
            device,
        )
        time_rows.append(_phase_rows(f"{name} project qr", meter_q, len(points_q) - 1))
        mem_rows.append(_memory_rows(f"{name} project qr", meter_q))
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
            time_rows.append(_phase_rows(f"{name} straightforward", meter_s, len(res)))
            mem_rows.append(_memory_rows(f"{name} straightforward", meter_s))
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
                    f"{_without_stats(meter_s) / _without_stats(meter_p):.1f}x",
                    f"{meter_s.total / meter_q.total:.1f}x",
                ]
            )
            row_data.update(
                {
                    "straightforward": dict(meter_s.seconds),
                    "straightforward_total": meter_s.total,
                    "speedup": speed,
                    "speedup_without_statistics": _without_stats(meter_s) / _without_stats(meter_p),
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


class RandomBatches:
    """``count`` random inputs (and dummy targets) in batches, generated on the fly (never kept)."""

    def __init__(self, count: int, features: int, batch: int, seed: int, device: torch.device):
        self.count, self.features, self.batch, self.seed, self.device = (
            count,
            features,
            batch,
            seed,
            device,
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        for start in range(0, self.count, self.batch):
            b = min(self.batch, self.count - start)
            x = torch.randn(b, self.features, generator=gen, device=self.device)
            yield x, torch.zeros(b, dtype=torch.long, device=self.device)


def classifier(dims: tuple[int, int, int, int], device: torch.device) -> nn.Sequential:
    """CaffeNet's classifier (fc6, fc7, fc8 with ReLU and dropout), random weights."""
    torch.manual_seed(0)
    d0, d6, d7, d8 = dims
    return (
        nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(d0, d6)),
                    ("relu6", nn.ReLU()),
                    ("drop6", nn.Dropout(0.5)),
                    ("fc7", nn.Linear(d6, d7)),
                    ("relu7", nn.ReLU()),
                    ("drop7", nn.Dropout(0.5)),
                    ("fc8", nn.Linear(d7, d8)),
                ]
            )
        )
        .to(device)
        .eval()
    )


def random_problem(
    dims: tuple[int, int, int, int], device: torch.device, n_eval: int, batch: int, points: int
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], Tensor, list[int]]:
    """A random classifier, held-out inputs labelled by it (the metric is top-1 agreement with
    the unreduced network), one example input, and a ``points``-point grid of fc6's width."""
    model = classifier(dims, device)
    eval_x = list(RandomBatches(n_eval, dims[0], batch, seed=1, device=device))
    with torch.no_grad():
        eval_data = [(x, model(x).argmax(-1)) for x, _ in eval_x]
    n = dims[1]
    grid = sorted(
        {max(1, round(v)) for v in torch.linspace(1, n, points + 1)[:-1].tolist()}, reverse=True
    )
    return model, eval_data, eval_x[0][0][:1], grid


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
        rows.append(_phase_rows(f"{method}", meter, len(points) - 1))
        mem_rows.append(_memory_rows(f"{method}", meter) + [_mb(peak)])
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
        + f"the n × K float64 matrix would take {_mb(8 * n * K)} "
        f"MiB; G = n × n float64 takes {_mb(8 * n * n)} MiB; the float32 weights take "
        f"{_mb(4 * sum(p.numel() for p in model.parameters()))} MiB and are not counted):\n\n"
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

    from lightning_neuronprune.selection import spectrum

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
    from lightning_neuronprune.linalg import pivoted_qr

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


class _PeakProbe:
    """Peak RSS above the level at the start of ``measure`` (a 2 ms sampling thread)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float, int]:
        gc.collect()
        base = _rss()
        self.peak = base
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        self.peak = max(self.peak, _rss())
        return out, seconds, self.peak - base

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def part_memory(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """Where the O(n²) memory goes, and that the sweep's peak does not grow with K.

    1. Each package function of a sweep step, alone, on statistics of n features (float64):
       time and transient peak RSS, in units of one n × n float64 matrix.
    2. The full project sweep (svd_qr) of a smaller classifier for several K: peak RSS per phase
       against n·K·8 bytes.
    """
    from lightning_neuronprune import JunctionStatistics
    from lightning_neuronprune.reconstruction import (
        least_squares_transform,
        reconstruct_consumer,
    )
    from lightning_neuronprune.selection import nested_order, select_neurons, spectrum

    n = 256 if args.tiny else args.memory_n
    nn_bytes = 8 * n * n
    gen = torch.Generator(device=device).manual_seed(0)
    stats = JunctionStatistics.zeros(n, device)
    for _ in range(max(2, (2 * n) // 1000 + 1)):
        stats.update(torch.randn(1000, n, generator=gen, device=device).relu_())
    W = torch.randn(n, n, generator=gen, device=device)
    probe = _PeakProbe()
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
            rows.append([name, f"{seconds:.2f}", _mb(peak), f"{peak / nn_bytes:.1f}"])
            del out
    finally:
        probe.close()
    report.add(
        f"#### Transient memory of each step, n = {n} (one n × n float64 matrix = "
        f"{_mb(nn_bytes)} MiB), device {device}\n\n"
        + md_table(["function", "seconds", "peak extra RSS MiB", "in n × n float64 units"], rows)
    )

    dims = (256, 128, 128, 100) if args.tiny else tuple(args.memory_dims)
    n2 = dims[1]
    grid = sorted({max(1, round(v)) for v in torch.linspace(1, n2, 9)[:-1].tolist()}, reverse=True)
    krows = []
    for K in args.memory_samples if not args.tiny else [1000, 4000]:
        progress(f"memory: K = {K} (fresh process)")
        cmd = [
            sys.executable,
            __file__,
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
                *(_mb(child["peak"].get(k, 0)) for k in PHASES[:-1]),
                _mb(child["hwm"]),
                _mb(8 * n2 * K),
                f"{child['total']:.1f}",
            ]
        )
    report.add(
        f"#### Peak extra RSS of the project's sweep against K, classifier "
        f"{'→'.join(map(str, dims))}, fc6's n = {n2}, {len(grid)} points, svd_qr "
        f"(n × n float64 = {_mb(8 * n2 * n2)} MiB)\n\n"
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
    model = classifier(dims, device)
    eval_x = list(RandomBatches(1000, dims[0], 1000, seed=1, device=device))
    with torch.no_grad():
        eval_data = [(x, model(x).argmax(-1)) for x, _ in eval_x]
    n = dims[1]
    grid = sorted({max(1, round(v)) for v in torch.linspace(1, n, 9)[:-1].tolist()}, reverse=True)
    metric = MulticlassAccuracy(num_classes=dims[3], average="micro").to(device)
    train = RandomBatches(K, dims[0], args.scale_batch, seed=0, device=device)
    meter, _ = project_sweep(
        model, "fc6", train, K, eval_data, metric, eval_x[0][0][:1], grid, "svd_qr", device
    )
    record = {"K": K, "hwm": meter.peak_hwm, "total": meter.total, "peak": meter.peak_rss}
    print(json.dumps(record))


def machine_description(device: torch.device) -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    text = (
        f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {getattr(np, '__version__', 'missing')}, "
        f"scipy {'present' if scipy_linalg is not None else 'missing'}"
    )
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_mnist = os.environ.get(
        "NEURONPRUNE_MNIST_DIR", str(REPO.parent / "shared" / "data" / "mnist")
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_mnist)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and BLAS threads (set before numpy loads; default: theirs)",
    )
    parser.add_argument("--tiny", action="store_true", help="CI: tiny models and sets, seconds")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["mnist", "scale", "qr"],
        choices=["mnist", "scale", "qr", "memory", "grid"],
        help="memory (where the O(n²) memory goes; peak vs K) is not in the default run",
    )
    parser.add_argument("--rows", nargs="+", default=None, choices=sorted(ROWS))
    parser.add_argument("--epochs", type=int, default=None, help="training epochs if not cached")
    parser.add_argument("--stats-samples", type=int, default=None, help="K (default 60000)")
    parser.add_argument("--eval-size", type=int, default=None, help="default 10000")
    parser.add_argument("--skip-straightforward", action="store_true")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the project's sweep of the first row, print N lines",
    )
    parser.add_argument("--scale-samples", type=int, default=None, help="default 50000")
    parser.add_argument("--scale-points", type=int, default=None, help="default 64")
    parser.add_argument("--scale-eval", type=int, default=None, help="default 2000")
    parser.add_argument("--scale-batch", type=int, default=500)
    parser.add_argument("--scale-methods", nargs="+", default=["svd_qr", "qr"])
    parser.add_argument("--grid-n", type=int, default=2048, help="part grid: layer width")
    parser.add_argument("--grid-samples", type=int, default=20_000, help="part grid: K")
    parser.add_argument("--memory-n", type=int, default=4096, help="part memory: n of step 1")
    parser.add_argument("--memory-dims", type=int, nargs=4, default=[2304, 1024, 1024, 1000])
    parser.add_argument("--memory-samples", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="write the tables into this markdown file's generated section",
    )
    parser.add_argument("--section", default=None, help="section name (default bench_sweep)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.rows = args.rows or (["LeNet300-100-FC3"] if tiny else ["LeNet5-FC2", "LeNet300-100-FC2"])
    args.stats_samples = args.stats_samples or (2000 if tiny else 60_000)
    args.eval_size = args.eval_size or (1000 if tiny else 10_000)
    args.scale_samples = args.scale_samples or (2000 if tiny else 50_000)
    args.scale_points = args.scale_points or (8 if tiny else 64)
    args.scale_eval = args.scale_eval or (500 if tiny else 2000)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    device = torch.device(args.device)
    if args.memory_child is not None:
        memory_child(args, device)
        return
    report = Report(args.markdown, args.section or "bench_sweep")
    started = time.perf_counter()
    report.add(
        f"### bench_sweep.py\n\nMachine: {machine_description(device)}. Command: "
        f"`{' '.join(['python', 'benchmarks/bench_sweep.py', *sys.argv[1:]])}`."
    )
    if "mnist" in args.parts:
        missing = [m for m in ("numpy",) if _optional(m) is None]
        data_ok = any(
            (Path(args.data_dir) / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz")
        )
        if missing or not data_ok:
            why = "numpy missing" if missing else f"no MNIST IDX files in {args.data_dir}"
            report.add(f"(part mnist skipped: {why})")
        else:
            part_mnist(args, device, report)
    if "scale" in args.parts:
        part_scale(args, device, report)
    if "qr" in args.parts:
        part_qr(args, device, report)
    if "memory" in args.parts:
        part_memory(args, device, report)
    if "grid" in args.parts:
        part_grid(args, device, report)
    report.add(f"Total wall time of this run: {time.perf_counter() - started:.0f} s.")
    if args.json is not None:
        args.json.write_text(json.dumps(report.data, indent=1, default=str))


if __name__ == "__main__":
    main()
