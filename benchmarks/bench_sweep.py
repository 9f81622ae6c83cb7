"""The project's rank sweep against a straightforward Algorithm 1, in one process run.

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

The pieces live beside this script: ``meters.py`` (time and memory per phase), ``sweeps.py``
(the two implementations), ``random_models.py``, ``parts_mnist.py`` and ``parts_random.py`` (the
parts), ``report.py`` (the markdown section and the machine).

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
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_MNIST  # noqa: E402
from parts_mnist import ROWS, part_mnist  # noqa: E402
from parts_random import memory_child, part_grid, part_memory, part_qr, part_scale  # noqa: E402
from report import Report, machine_description  # noqa: E402
from sweeps import np, optional, scipy_linalg  # noqa: E402


def describe_machine(device: torch.device) -> str:
    """``report.machine_description`` plus the numpy and scipy that the baselines use."""
    return (
        f"{machine_description(device)}, numpy {getattr(np, '__version__', 'missing')}, "
        f"scipy {'present' if scipy_linalg is not None else 'missing'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_MNIST)
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
    device = torch.device(args.device)
    if args.memory_child is not None:
        memory_child(args, device)
        return
    report = Report(args.markdown, args.section or "bench_sweep")
    started = time.perf_counter()
    report.add(
        f"### bench_sweep.py\n\nMachine: {describe_machine(device)}. Command: "
        f"`{' '.join(['python', 'benchmarks/bench_sweep.py', *sys.argv[1:]])}`."
    )
    if "mnist" in args.parts:
        missing = [m for m in ("numpy",) if optional(m) is None]
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
