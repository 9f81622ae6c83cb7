"""The two implementations of the rank sweep that bench_sweep.py compares, instrumented.

* ``project_sweep``: the package's public path, ``collect_statistics`` (streamed ``G = X Xᵀ``),
  a ``CachedEvaluator``, the selection of the whole grid (``JunctionFitter``), then
  ``sweep_junction``; timed at the phase boundaries only.
* ``straightforward_sweep``: Algorithm 1 the way a careful reader of the paper writes it. The full
  n × K activation matrix ``X`` is kept in numpy (float64, the precision the package accumulates
  in); ``numpy.linalg.svd(X)``; for every p ``scipy.linalg.qr(U_pᵀ, pivoting=True)`` (LAPACK
  geqp3); Eq. 6 as written, ``T = X X_pᵀ (X_p X_pᵀ)⁻¹``, ``W_p = W T``; the reduced network is
  built (``copy.deepcopy`` plus new layers) and a full forward pass over the evaluation set gives
  the accuracy; the same ``EnergyModel`` prices it.

numpy and scipy are optional: ``np`` and ``scipy_linalg`` are ``None`` when missing.
"""

from __future__ import annotations

import copy
import cProfile
from typing import Any

import torch
from meters import Meter
from torch import Tensor, nn


def optional(name: str) -> Any:
    """The module ``name``, or ``None`` when it is not installed."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


np = optional("numpy")
scipy_linalg = optional("scipy.linalg")


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
    from lightning_neuronprune.core.fitting import FitOptions, JunctionFitter
    from lightning_neuronprune.search.sweep import CachedEvaluator, rank_grid, sweep_junction

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
    from lightning_neuronprune.search.sweep import rank_grid

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
