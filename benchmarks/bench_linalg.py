"""Benchmark the torch pivoted factorizations against LAPACK on the same CPU, in the same run.

* ``pivoted_qr`` vs ``scipy.linalg.qr(A, mode="economic", pivoting=True)`` (LAPACK ``geqp3`` +
  ``orgqr``) on ``A = U_pᵀ``, ``p × n`` with ``p = n / 2``: the matrix whose pivoted QR selects
  the neurons in Algorithm 2. ``U_p`` (``n × p``, orthonormal columns) is the Q factor of a
  Gaussian ``n × p`` matrix, distributed as the leading left singular vectors of a Gaussian
  activation matrix.
* ``pivoted_cholesky`` vs LAPACK ``dpstrf`` on ``G = X Xᵀ`` (float64, the dtype of accumulated
  statistics) with ``X`` Gaussian ``n × p``: ``G`` has rank ``p``, so both stop after ``p``
  pivots. Its pivots are compared with those of ``dpstrf`` and of ``geqp3(Xᵀ)``.

Times are the minimum over ``--repeat`` runs; the runs of the two codes are interleaved so that
both see the same machine load. ``ratio`` is ours / LAPACK. When pivots differ, the table shows the
first differing position and the relative gap between the two candidates' partial norms there,
measured in float64: a gap at the dtype's round-off level is a near-tie, not a wrong pivot (after
it the two pivot sequences legitimately diverge).

Example::

    python benchmarks/bench_linalg.py --sizes 1024 4096 --repeat 3
    python benchmarks/bench_linalg.py --threads 1 --clock cpu  # on a shared machine
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

Clock = Callable[[], float]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="values of n")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per code (minimum kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "float64"],
        default=["float32"],
        help="dtypes of the pivoted QR benchmark",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and OpenBLAS (default: the libraries' own default)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time, CPU time summed over the threads "
        "(with --threads 1 it is robust to other processes sharing the machine)",
    )
    parser.add_argument("--skip-cholesky", action="store_true", help="only time the pivoted QR")
    return parser.parse_args()


def _interleaved(
    fns: list[Callable[[], Any]], repeat: int, clock: Clock
) -> list[tuple[float, Any]]:
    """Minimum time of ``repeat`` calls of each function, and its last result.

    The functions are called in turn, so that all of them see the same machine load.
    """
    best = [float("inf")] * len(fns)
    outs: list[Any] = [None] * len(fns)
    for _ in range(repeat):
        for j, fn in enumerate(fns):
            t0 = clock()
            outs[j] = fn()
            best[j] = min(best[j], clock() - t0)
    return list(zip(best, outs, strict=True))


def _pivot_agreement(M, perm, perm_ref, count: int) -> str:
    """``"yes"``, or the first differing position and the float64 partial-norm gap there.

    ``M`` is the matrix whose columns are pivoted (numpy), ``perm``/``perm_ref`` numpy int arrays.
    """
    import numpy as np

    diff = np.flatnonzero(perm[:count] != perm_ref[:count])
    if diff.size == 0:
        return "yes"
    j = int(diff[0])
    M = np.asarray(M, dtype=np.float64)
    cand = M[:, [perm[j], perm_ref[j]]]
    if j:
        Qc, _ = np.linalg.qr(M[:, perm_ref[:j]])
        cand = cand - Qc @ (Qc.T @ cand)
    nrm = np.linalg.norm(cand, axis=0)
    gap = abs(nrm[0] - nrm[1]) / nrm.max()
    same_set = set(perm[:count].tolist()) == set(perm_ref[:count].tolist())
    return f"from #{j} (gap {gap:.1e}; set {'same' if same_set else 'differs'})"


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    print(f"\n{title}\n{line}\n{'-' * len(line)}")
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def bench_qr(sizes: list[int], dtypes: list[str], repeat: int, seed: int, clock: Clock) -> None:
    """Pivoted QR of ``U_pᵀ``: ``pivoted_qr`` vs ``scipy.linalg.qr(pivoting=True)``."""
    import scipy.linalg
    import torch

    from lightning_neuronprune.core.linalg import pivoted_qr

    rows = []
    for n in sizes:
        p = n // 2
        gen = torch.Generator().manual_seed(seed + n)
        U = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))[0]
        for dtype_name in dtypes:
            A = U.T.contiguous().to(getattr(torch, dtype_name))  # (p, n)
            A_np = A.numpy().copy()
            pivoted_qr(A)  # warm-up: allocator, thread pools
            scipy.linalg.qr(A_np, mode="economic", pivoting=True)
            (t_ref, ref), (t_ours, ours) = _interleaved(
                [
                    lambda A_np=A_np: scipy.linalg.qr(A_np, mode="economic", pivoting=True),
                    lambda A=A: pivoted_qr(A),
                ],
                repeat,
                clock,
            )
            Q, R, perm = ours
            A64 = A.double()
            err = ((A64[:, perm] - Q.double() @ R.double()).norm() / A64.norm()).item()
            rows.append(
                [
                    str(n),
                    f"{p}x{n}",
                    dtype_name,
                    f"{t_ref:.4f}",
                    f"{t_ours:.4f}",
                    f"{t_ours / t_ref:.2f}",
                    f"{err:.1e}",
                    _pivot_agreement(A_np, perm.numpy(), ref[2], p),
                ]
            )
    _print_table(
        "pivoted QR of A = U_p^T (p = n/2 rows, n columns to pivot)",
        [
            "n",
            "shape",
            "dtype",
            "scipy geqp3 [s]",
            "pivoted_qr [s]",
            "ratio",
            "|AP-QR|/|A|",
            "same pivots as geqp3",
        ],
        rows,
    )


def bench_cholesky(sizes: list[int], repeat: int, seed: int, clock: Clock) -> None:
    """Pivoted Cholesky of ``G = X Xᵀ`` (float64, rank n/2) vs LAPACK ``dpstrf``."""
    import scipy.linalg
    import torch
    from scipy.linalg import lapack

    from lightning_neuronprune.core.linalg import pivoted_cholesky

    rows = []
    for n in sizes:
        p = n // 2
        gen = torch.Generator().manual_seed(seed + 7 * n)
        X = torch.randn(n, p, generator=gen, dtype=torch.float64)
        G = X @ X.T
        G_np = G.numpy()
        pivoted_cholesky(G)
        (t_ref, ref), (t_ours, ours) = _interleaved(
            [lambda G_np=G_np: lapack.dpstrf(G_np, lower=1), lambda G=G: pivoted_cholesky(G)],
            repeat,
            clock,
        )
        L, perm, rank = ours
        err = ((G[perm[:, None], perm] - L @ L.T).norm() / G.norm()).item()
        Xt = X.numpy().T  # (p, n): its pivoted columns are the rows of X
        perm_qr = scipy.linalg.qr(Xt, mode="economic", pivoting=True)[2]
        rows.append(
            [
                str(n),
                f"{p}",
                f"{t_ref:.4f}",
                f"{t_ours:.4f}",
                f"{t_ours / t_ref:.2f}",
                f"{rank}/{int(ref[2])}",
                f"{err:.1e}",
                _pivot_agreement(Xt, perm.numpy(), ref[1] - 1, p),  # LAPACK's are 1-based
                _pivot_agreement(Xt, perm.numpy(), perm_qr, p),
            ]
        )
    _print_table(
        "pivoted Cholesky, float64, G = X X^T (n x n, rank p = n/2)",
        [
            "n",
            "k",
            "LAPACK dpstrf [s]",
            "pivoted_cholesky [s]",
            "ratio",
            "rank ours/LAPACK",
            "|G-LL^T|/|G|",
            "= dpstrf pivots",
            "= geqp3(X^T) pivots",
        ],
        rows,
    )


_STATS_CHILD = """
import resource, sys, torch
from torch import nn
from lightning_neuronprune.core.recording import collect_statistics
torch.manual_seed(0)
width, K, batch = int(sys.argv[1]), int(sys.argv[2]), 1000
model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
def batches():
    for _ in range(K // batch):
        yield torch.randn(batch, 64)
collect_statistics(model, ["2"], batches(), max_samples=batch)  # warm up allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = collect_statistics(model, ["2"], batches())["2"]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(stats.count, before, after)
"""


def bench_statistics_memory(width: int, counts: list[int]) -> None:
    """Peak resident memory of streaming statistics, in a fresh process per sample count K.

    The figure is the growth of the process's peak RSS (``ru_maxrss``) during
    :func:`collect_statistics`, after a warm-up pass: it must not grow with K.
    """
    import subprocess
    import sys

    rows = []
    for K in counts:
        out = subprocess.run(
            [sys.executable, "-c", _STATS_CHILD, str(width), str(K)],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        count, before, after = (int(v) for v in out)
        rows.append(
            [
                str(K), str(count), f"{before / 1024:.1f}", f"{after / 1024:.1f}",
                f"{(after - before) / 1024:.1f}", f"{width * K * 4 / 2**20:.0f}",
            ]
        )  # fmt: skip
    _print_table(
        f"Statistics collection, {width}-wide layer, batches of 1000 (peak RSS, MiB)",
        ["K", "samples seen", "peak before", "peak after", "growth", "n×K float32 matrix"],
        rows,
    )


def main() -> None:
    args = _parse_args()
    if args.threads is not None:  # before numpy/scipy load OpenBLAS
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import scipy
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock: Clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, scipy {scipy.__version__}; "
        f"{args.clock} clock, best of {args.repeat}; load average {os.getloadavg()[0]:.2f}"
    )
    bench_qr(args.sizes, args.dtypes, args.repeat, args.seed, clock)
    if not args.skip_cholesky:
        bench_cholesky(args.sizes, args.repeat, args.seed, clock)
    bench_statistics_memory(1024, [10_000, 100_000])


if __name__ == "__main__":
    main()
