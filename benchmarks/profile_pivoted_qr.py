"""Where the time of ``pivoted_qr`` goes on a device: stages timed with a device sync around each,
then a ``torch.profiler`` table of the kernels.

Example::

    python benchmarks/profile_pivoted_qr.py --device cuda --n 4096
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_neuronprune.core.cholesky import pivoted_cholesky
from lightning_neuronprune.core.linalg import pivoted_qr


def _timed(device: torch.device, fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, p = args.n, args.n // 2
    gen = torch.Generator().manual_seed(n)
    U = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))[0]
    A = U.T.contiguous().to(device=device, dtype=dtype)
    A64 = A.double()
    G = A64.T @ A64
    perm = pivoted_qr(A, k=p, compute_q=False).perm  # warm-up (and the pivots)
    stages = {
        "pivoted_qr, compute_q=True": lambda: pivoted_qr(A, k=p),
        "pivoted_qr, compute_q=False": lambda: pivoted_qr(A, k=p, compute_q=False),
        "Gram AᵀA in float64": lambda: A.double().T @ A.double(),
        f"pivoted_cholesky(AᵀA, k={p})": lambda: pivoted_cholesky(G, k=p, rtol=0.0),
        "geqrf(A[:, perm])": lambda: torch.geqrf(A.index_select(1, perm)),
    }
    print(f"{args.dtype} {p} x {n} on {device}")
    for name, fn in stages.items():
        print(f"  {name:32s} {1e3 * _timed(device, fn):8.1f} ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        pivoted_qr(A, k=p)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
