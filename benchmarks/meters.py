"""Meters of the benchmarks: wall time and peak memory per phase, and the tables of them.

**Memory.** A sampling thread reads the resident set size (``/proc/self/statm``) every 2 ms; the
figure per phase is the largest RSS seen while in that phase minus the RSS when the implementation
started (after ``gc.collect()``), i.e. the extra memory it needed. With ``trace_numpy``,
``tracemalloc`` also gives the peak of numpy's own allocations (numpy reports its buffers to
tracemalloc; torch does not). On CUDA, ``torch.cuda.max_memory_allocated`` is reported too.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

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


def rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import psutil

        return psutil.Process().memory_info().rss


def reset_vm_hwm() -> None:
    """Reset the kernel's peak RSS (``VmHWM``) to the current RSS (Linux >= 4.0; else no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def vm_hwm() -> int:
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
                extra = rss() - self._base
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
        reset_vm_hwm()
        self._base = rss()
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
        hwm = vm_hwm()
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
            extra = rss() - self._base
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


def mb(x: int | float | None) -> str:
    """Bytes as whole MiB; "—" for ``None``."""
    return "—" if x is None else f"{x / 2**20:.0f}"


def without_statistics(meter: Meter) -> float:
    """The run's total seconds less its ``statistics`` phase."""
    return meter.total - meter.seconds.get("statistics", 0.0)


def phase_row(label: str, meter: Meter, npoints: int) -> list[Any]:
    """A table row: ``label``, the number of points, seconds per phase of ``PHASES``, total."""
    return [
        label,
        npoints,
        *(f"{meter.seconds.get(k, 0.0):.2f}" for k in PHASES),
        f"{meter.total:.2f}",
    ]


def memory_row(label: str, meter: Meter) -> list[Any]:
    """A table row: ``label``, then the peak extra RSS (MiB) of each phase but ``other``, with
    numpy's traced peak and the CUDA peak after slashes where measured."""
    cells = []
    for k in PHASES[:-1]:
        cell = mb(meter.peak_rss.get(k, 0))
        if meter.trace_numpy:
            cell += f" / {mb(meter.peak_numpy.get(k, 0))}"
        if meter.peak_cuda:
            cell += f" / {mb(meter.peak_cuda.get(k, 0))} GPU"
        cells.append(cell)
    return [label, *cells]


class PeakProbe:
    """Peak RSS above the level at the start of ``measure`` (a 2 ms sampling thread)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float, int]:
        gc.collect()
        base = rss()
        self.peak = base
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        self.peak = max(self.peak, rss())
        return out, seconds, self.peak - base

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
