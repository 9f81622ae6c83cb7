"""The strategies of :class:`~lightning_neuronprune.search.joint.JointSearch`: which joint
configurations ``{layer: p}`` to evaluate, under one accuracy budget.

:mod:`lightning_neuronprune.search.joint` holds the search's building blocks (fitting, building,
scoring
and applying one configuration, and the points it keeps); the functions here decide which
configurations to try, calling those blocks (``evaluate``, ``score``, ``statistics`` and
``from_sweep``, which record each point for ``JointSearch.apply``) on the ``search`` they are
given. Every strategy is a function ``strategy(search, budget, **options) -> list[JointPoint]``
(:class:`Strategy`), looked up by name in :data:`STRATEGIES`.

* ``"greedy"`` (by marginal cost): start from the unreduced network; at each step, try moving
  every layer one point down its rank grid, and take the move with the most energy saved per
  accuracy lost that keeps the total drop within the budget. Each junction is fitted on the
  original network's statistics. The chosen configuration is finally re-fitted sequentially on
  data (:func:`sequential_refit`), which is recorded as one more point.
  With ``compensate``, the greedy path is also re-fitted by *compensating* fits
  (:func:`compensated_refit`, :mod:`~lightning_neuronprune.search.compensation`): junction by
  junction,
  the consumer of the reduced network is fitted to reproduce the original network's consumer
  output from the kept features (cross statistics of both networks on the same training data), so
  each fit absorbs the errors of the junctions before it. The path is explored up to
  ``budget + slack`` and the compensated re-fits are tried from the cheapest configuration up.
* ``"sequential"`` (data-driven): reduce one junction after another (``order``); the statistics of
  each junction are collected on the network reduced so far, so that its least-squares fit
  compensates earlier errors. Junction i may use ``budget · share_i`` of the drop, cumulatively.
* ``"allocate"`` (budgeted, for many junctions): widths are allocated across layers by a local
  proxy (the second-order loss increase of each fit, from the statistics and one backward pass;
  :mod:`~lightning_neuronprune.search.sensitivity`), and bisection along the resulting path
  spends at most ``max_evaluations`` full evaluations
  (:mod:`~lightning_neuronprune.search.allocation`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.search.allocation import (
    allocation_path,
    allowed_widths,
    bisect_path,
    proxy_curve,
    uniform_path,
    weights_per_feature,
)
from lightning_neuronprune.search.compensation import collect_cross_statistics, compensate_junction
from lightning_neuronprune.search.elimination import reduce_junction
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.joint import JointPoint, JointSearch
from lightning_neuronprune.search.sweep import sweep_junction
from lightning_neuronprune.structure.conv import statistics_channels

__all__ = [
    "STRATEGIES",
    "Strategy",
    "allocate",
    "compensated_refit",
    "greedy",
    "sequential",
    "sequential_refit",
]


class Strategy(Protocol):
    """A joint strategy: evaluates configurations of ``search`` within ``budget`` and returns
    every point it evaluated (the search keeps them for :meth:`JointSearch.apply`)."""

    def __call__(
        self, search: JointSearch, budget: float, /, **options: Any
    ) -> list[JointPoint]: ...


def greedy(
    search: JointSearch,
    budget: float,
    *,
    refit: bool = True,
    lazy: bool = True,
    compensate: bool = False,
    slack: float = 0.0,
) -> list[JointPoint]:
    """Greedy by marginal cost. Returns every evaluated point, the path's points included.

    A move takes one layer one point down its grid. Its merit is the energy saved per
    accuracy point lost (moves that lose nothing come first, by energy saved). With ``lazy``,
    merits from earlier steps serve as estimates: only the most promising move is
    re-evaluated, and taken if it is still the best (the classic lazy-greedy shortcut,
    which saves most evaluations when merits shrink as the network gets smaller).

    Args:
        search: the search whose building blocks fit, build and score each configuration.
        budget: the largest accepted accuracy drop.
        refit: re-fit the final configuration sequentially on ``train_data`` (if given).
        lazy: re-evaluate only the most promising move at each step.
        compensate: also re-fit the path's configurations with compensating fits (needs
            ``train_data``), from the cheapest within ``budget + slack`` up, until one is
            within ``budget``; every compensated point is returned
            (strategy ``"greedy+compensated"``).
        slack: how far past the budget the greedy path explores for ``compensate``.
    """
    if slack < 0:
        raise ValueError(f"`slack` must be non-negative, got {slack!r}")
    explore = budget + slack if compensate and search.train_data is not None else budget
    path: list[JointPoint] = []
    config = {j.layer: j.num_features for j in search.junctions}
    position = {layer: 0 for layer in config}
    current = search.baseline
    points: list[JointPoint] = []
    estimate: dict[str, tuple[bool, float]] = {}
    infinite = (True, float("inf"))

    def merit(pt: JointPoint) -> tuple[bool, float]:
        if pt.accuracy_drop > explore:
            return (False, -float("inf"))
        saved = current.energy.total - pt.energy.total
        lost = pt.accuracy_drop - current.accuracy_drop
        return (lost <= 0, saved if lost <= 0 else saved / lost)

    while True:
        movable = [l for l, g in search.grids.items() if position[l] + 1 < len(g)]
        fresh: dict[str, JointPoint] = {}
        best: str | None = None
        for layer in sorted(movable, key=lambda l: estimate.get(l, infinite), reverse=True):
            pt = search.evaluate({**config, layer: search.grids[layer][position[layer] + 1]})
            points.append(pt)
            fresh[layer] = pt
            estimate[layer] = merit(pt)
            rivals = [estimate.get(l, infinite) for l in movable if l not in fresh]
            top = max(fresh, key=lambda l: estimate[l])
            if (
                lazy
                and estimate[top][1] > -float("inf")
                and all(estimate[top] >= r for r in rivals)
            ):
                best = top
                break
        else:
            feasible = [l for l in fresh if estimate[l][1] > -float("inf")]
            best = max(feasible, key=lambda l: estimate[l]) if feasible else None
        if best is None:
            break
        current = fresh[best]
        path.append(current)
        position[best] += 1
        config = dict(current.config)
    points = list({id(pt): pt for pt in points}.values())  # evaluations are memoised
    within = [pt for pt in path if pt.accuracy_drop <= budget]
    if refit and search.train_data is not None and within:
        points.append(sequential_refit(search, within[-1]))
    if compensate and search.train_data is not None:
        for pt in sorted(path, key=lambda q: q.energy.total):
            fitted = compensated_refit(search, pt)
            points.append(fitted)
            if fitted.accuracy_drop <= budget:
                break
    return points


def compensated_refit(search: JointSearch, point: JointPoint) -> JointPoint:
    """Re-fit ``point``'s configuration junction by junction with compensating fits.

    Junctions are reduced in network order on a copy of the model; each consumer is fitted
    (and, with ``method="output"``, its kept set re-selected) against the original network's
    consumer output, from cross statistics over ``train_data``. Other methods keep
    ``point``'s kept sets. The affine option fits an intercept, folded into the consumer's bias
    (created where it had none); the ridge option does not apply to this fit.
    """
    if search.train_data is None:
        raise ValueError("the compensated refit needs `train_data`")
    work = copy.deepcopy(search.model)
    kept: dict[str, tuple[int, ...]] = {}
    for j in search.junctions:
        p = point.config[j.layer]
        if p >= j.num_features:
            continue
        cs = collect_cross_statistics(
            search.model, work, j.consumer, search.train_data, max_samples=search.max_samples,
            **search.stat_options,
            channels=statistics_channels(search.model, [j]).get(j.consumer),
        )  # fmt: skip
        given = None if search.method == "output" else torch.as_tensor(point.kept[j.layer])
        chosen = compensate_junction(work, j, cs, p, kept=given, affine=search.affine)
        kept[j.layer] = tuple(int(i) for i in chosen.tolist())
    stats = {search.by_layer[layer].consumer: search.stats[search.by_layer[layer].consumer]
             for layer in kept}  # fmt: skip
    weights = {}
    for consumer in stats:
        module = work.get_submodule(consumer)
        bias = module.bias.detach().clone() if module.bias is not None else None
        weights[consumer] = (module.weight.detach().clone(), bias)
    return search.score(work, point.config, "greedy+compensated", kept, stats, weights)


def sequential_refit(search: JointSearch, point: JointPoint) -> JointPoint:
    """Re-fit ``point``'s configuration junction by junction on data, keeping its kept sets."""
    work = copy.deepcopy(search.model)
    stats: dict[str, JunctionStatistics] = {}
    for j in search.junctions:
        p = point.config[j.layer]
        if p >= j.num_features:
            continue
        st = search.statistics(work, j.consumer)
        reduce_junction(
            work, j, st, p, method=search.method, affine=search.affine, ridge=search.ridge,
            kept=torch.as_tensor(point.kept[j.layer]),
        )  # fmt: skip
        stats[j.consumer] = st
    return search.score(work, point.config, "greedy+refit", point.kept, stats)


def sequential(
    search: JointSearch,
    budget: float,
    *,
    order: Sequence[str] | None = None,
    shares: Sequence[float] | None = None,
) -> list[JointPoint]:
    """Data-driven sequential reduction. Returns every evaluated point.

    Args:
        search: the search whose junctions, grids and options are used.
        budget: the largest accepted accuracy drop of the whole network.
        order: the layers in the order to reduce them (default: network order).
        shares: the fraction of the budget each layer may add (default: equal); junction i may
            bring the total drop to ``budget · (shares_0 + ... + shares_i)``.
    """
    if search.train_data is None:
        raise ValueError("the sequential strategy needs `train_data` to re-collect statistics")
    layers = list(order) if order is not None else [j.layer for j in search.junctions]
    if sorted(layers) != sorted(search.by_layer):
        raise ValueError(
            f"`order` must be a permutation of {sorted(search.by_layer)}, got {layers}"
        )
    weights = list(shares) if shares is not None else [1.0] * len(layers)
    if len(weights) != len(layers) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"`shares` must be {len(layers)} non-negative numbers, got {shares}")
    total = sum(weights)
    work = copy.deepcopy(search.model)
    config = {j.layer: j.num_features for j in search.junctions}
    kept: dict[str, tuple[int, ...]] = {}
    stats_used: dict[str, JunctionStatistics] = {}
    points: list[JointPoint] = []
    allowed = 0.0
    for layer, w in zip(layers, weights, strict=True):
        allowed += budget * w / total
        j = search.by_layer[layer]
        st = search.statistics(work, j.consumer)
        evaluator = CachedEvaluator(
            work, j.consumer, search.eval_data, search.metric, **search.eval_options
        )
        base = (search.baseline.accuracy, search.baseline.energy)
        swept = sweep_junction(
            work, j, st, evaluator, search.energy_model, search.example_input,
            ranks=[p for p in search.grids[layer] if p < j.num_features] or [j.num_features],
            method=search.method, affine=search.affine, ridge=search.ridge,
            max_accuracy_drop=allowed, baseline=base,
        )  # fmt: skip
        for sp in swept[1:]:
            config_i, kept_i = {**config, layer: sp.p}, {**kept, layer: sp.kept}
            points.append(search.from_sweep(sp, config_i, kept_i, {**stats_used, j.consumer: st}))
        ok = [sp for sp in swept[1:] if sp.accuracy_drop <= allowed]
        if not ok:
            continue
        best = min(ok, key=lambda sp: (sp.energy.total, -sp.accuracy))
        reduce_junction(
            work, j, st, best.p, method=search.method, affine=search.affine, ridge=search.ridge,
            kept=torch.as_tensor(best.kept),
        )  # fmt: skip
        config[layer] = best.p
        kept[layer] = best.kept
        stats_used[j.consumer] = st
    return points


def allocate(
    search: JointSearch,
    budget: float,
    *,
    uniform: bool = False,
    multiple: int | None = None,
    max_evaluations: int = 20,
    sensitivity: Mapping[str, Tensor] | None = None,
) -> list[JointPoint]:
    """Budgeted allocation: proxy curves, a path of joint configurations, bisection on it.

    No junction is swept: the per-layer proxy (the second-order loss increase with
    ``sensitivity``, otherwise the unexplained share of the consumer output energy after the fit;
    :func:`~lightning_neuronprune.search.allocation.proxy_curve`) orders
    the reductions, and only the configurations that the bisection visits are evaluated, each
    fitted on the original statistics, then (while evaluations remain) two configurations at
    3/4 and 1/2 of the way to the last one within the budget, so that a held-out confirmation
    that rejects the last one (it keeps a reserve) has cheaper ones to try. Returns the
    evaluated points (at most ``max_evaluations``).

    Args:
        search: the search whose fitters, grids and evaluator are used.
        budget: the largest accepted drop.
        uniform: every layer keeps the same fraction of its width (the same p for equal widths).
        multiple: widths are multiples of this (the unreduced width is always allowed);
            otherwise the rank grid of each junction.
        max_evaluations: the most full evaluations spent.
        sensitivity: ``{consumer: F}``, the diagonal Fisher of each consumer's output
            (:func:`~lightning_neuronprune.search.sensitivity.output_sensitivity`); the proxy
            is then the second-order loss increase, comparable across junctions, instead of the
            unexplained share of each consumer's own output energy.
    """
    if max_evaluations < 1:
        raise ValueError(f"`max_evaluations` must be a positive integer, got {max_evaluations!r}")
    if multiple is not None and multiple < 1:
        raise ValueError(f"`multiple` must be a positive integer or None, got {multiple!r}")
    if uniform or multiple is not None:
        widths = {
            j.layer: allowed_widths(j.num_features, search.ranks, multiple)
            for j in search.junctions
        }
    else:
        widths = {layer: list(grid) for layer, grid in search.grids.items()}
    if uniform:
        path = uniform_path(widths)
    else:
        fisher = sensitivity or {}
        curves = {
            layer: proxy_curve(
                search.fitter(layer), ws, fisher.get(search.by_layer[layer].consumer)
            )
            for layer, ws in widths.items()
        }
        cost = {j.layer: weights_per_feature(search.model, j) for j in search.junctions}
        path = allocation_path(widths, curves, cost)
    points: list[JointPoint] = []

    def within(i: int) -> bool:
        pt = search.evaluate(path[i], "allocate")
        points.append(pt)
        return pt.accuracy_drop <= budget

    last = bisect_path(len(path), within, max_evaluations)
    # configurations further below the budget, for a held-out confirmation that rejects the
    # last one within it (its reserve asks for less than the whole budget)
    for i in sorted({last * 3 // 4, last // 2} - {0, last}, reverse=True):
        if len(points) < max_evaluations:
            within(i)
    return points


#: The strategies by name, as the ``joint`` setting names them.
STRATEGIES: dict[str, Strategy] = {
    "allocate": allocate,
    "greedy": greedy,
    "sequential": sequential,
}
