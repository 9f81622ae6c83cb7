"""Simplifying several layers at once under one accuracy budget: the joint search.

The paper applies the procedure to several layers of a network "to maximize the compression
ratio ... subject to an overall budget in degradation of accuracy across all the simplified
layers". A :class:`JointSearch` fits, builds, scores and applies joint configurations
``{layer: p}``; its strategies (``"greedy"`` by marginal cost and ``"sequential"``, data-driven),
which choose the configurations to try, are in :mod:`lightning_neuronprune.search.strategies`.

Every evaluated joint configuration is kept as a :class:`JointPoint`; :func:`pareto_front`
(from :mod:`~lightning_neuronprune.search.pareto`) applies to them too, and
:meth:`JointSearch.apply` swaps
the chosen one into a model exactly as it was evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.fitting import FitOptions, JunctionFitter
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.core.selection import Method
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.cost.energy import EnergyModel, EnergyReport
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search.elimination import Elimination, eliminate_neurons
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.sweep import Ranks, SweepPoint, rank_grid
from lightning_neuronprune.structure.conv import full_width_consumer, statistics_channels
from lightning_neuronprune.structure.conv_fit import junction_fitter
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import GatheredLinear, linear_from
from lightning_neuronprune.structure.surgery import apply_reduction

__all__ = ["JointPoint", "JointSearch"]


@dataclass(frozen=True)
class JointPoint:
    """One evaluated joint configuration.

    Attributes:
        config: ``{layer: p}`` for every target (``p == n`` where a layer is untouched).
        accuracy: the metric on the evaluation data.
        accuracy_drop: the original network's metric minus this one.
        energy: the modelled energy of the reduced network.
        energy_ratio: original total energy / this one.
        memory_ratio: original parameter memory / this one.
        strategy: what produced it (``"baseline"``, ``"greedy"``, ``"greedy+refit"``,
            ``"sequential"``).
        kept: ``{layer: kept indices}`` of the reduced layers.

    A point carries numbers only; the statistics each junction was fitted with stay with the
    :class:`JointSearch` that made it (:meth:`JointSearch.apply`).
    """

    config: dict[str, int]
    accuracy: float
    accuracy_drop: float
    energy: EnergyReport
    energy_ratio: float
    memory_ratio: float
    strategy: str
    kept: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    def as_dict(self, *, kept: bool = False) -> dict[str, Any]:
        """Plain values for reports (energies in joules, memory in bits)."""
        out = {
            "strategy": self.strategy,
            "config": dict(self.config),
            "accuracy": self.accuracy,
            "accuracy_drop": self.accuracy_drop,
            "energy_ratio": self.energy_ratio,
            "memory_ratio": self.memory_ratio,
            "params": self.energy.weights,
            "energy_total": self.energy.total,
            "energy_mac": self.energy.mac,
            "energy_sram_weights": self.energy.sram_weights,
            "energy_sram_activations": self.energy.sram_activations,
            "energy_dram": self.energy.dram,
            "memory_params_bits": self.energy.params_bits,
            "memory_total_bits": self.energy.total_bits,
        }
        if kept:
            out["kept"] = {k: list(v) for k, v in self.kept.items()}
        return out


class JointSearch:
    """Searches joint configurations of several junctions of one model.

    Args:
        model: the trained network (never modified; reduced copies are built).
        junctions: the targets, from
        :func:`~lightning_neuronprune.structure.discovery.find_junction`.
        stats: ``{consumer: statistics}`` on the original network, for every junction.
        eval_data: evaluation batches.
        metric: a ``torchmetrics.Metric``.
        energy_model: prices each configuration.
        example_input: one input for the energy model.
        train_data: batches for re-collecting statistics on reduced networks (``sequential``
            strategy and the greedy refit); ``None`` disables both.
        method, affine, ridge: the selection and reconstruction options.
        ranks: the grid of every layer (see :func:`~lightning_neuronprune.search.sweep.rank_grid`).
        max_samples: samples for re-collected statistics.
        on_point: called with each evaluated point (progress).
        baseline: ``(metric, energy)`` of the unreduced model, if already measured.
        fitters: ``{layer: JunctionFitter}`` already built on the same statistics and options
            (the sweep's), whose selection work is reused.
        transfer, forward_context: how batches reach the model and what its forward passes run
            under (see :func:`~lightning_neuronprune.core.recording.collect_statistics`).
        data_fns: the batch adapters ``input_fn``, ``target_fn``, ``output_fn`` and ``mask_fn``
            (see :class:`~lightning_neuronprune.search.evaluation.CachedEvaluator` and
            :func:`~lightning_neuronprune.core.recording.collect_statistics`); unset ones default.
    """

    def __init__(
        self,
        model: nn.Module,
        junctions: Sequence[Junction],
        stats: Mapping[str, JunctionStatistics],
        eval_data: Iterable[Any],
        metric: Any,
        energy_model: EnergyModel,
        example_input: Any,
        *,
        train_data: Iterable[Any] | None = None,
        method: Method = "svd_qr",
        affine: bool = False,
        ridge: float = 0.0,
        ranks: Ranks = "auto",
        max_samples: int | None = None,
        on_point: Callable[[JointPoint], None] | None = None,
        baseline: tuple[float, EnergyReport] | None = None,
        fitters: Mapping[str, JunctionFitter] | None = None,
        transfer: Callable[[Any], Any] | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
        data_fns: Mapping[str, Any] | None = None,
    ) -> None:
        self._forward: dict[str, Any] = {"transfer": transfer, "forward_context": forward_context}
        fns = dict(data_fns or {})
        self.eval_options = {**self._forward, **{k: fns.get(k) for k in ("input_fn", "target_fn")}}
        self.eval_options["output_fn"] = fns.get("output_fn")
        self.stat_options = {**self._forward, **{k: fns.get(k) for k in ("input_fn", "mask_fn")}}
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        self.model = model
        self.junctions = sorted(junctions, key=lambda j: order[j.consumer])
        self.by_layer = {j.layer: j for j in self.junctions}
        self.stats = dict(stats)
        self.eval_data = eval_data
        self.metric = metric
        self.energy_model = energy_model
        self.example_input = example_input
        self.train_data = train_data
        self.method, self.affine, self.ridge = method, affine, ridge
        self.max_samples = max_samples
        self.ranks = ranks
        self.on_point = on_point
        options = FitOptions(method=method, affine=affine, ridge=ridge)
        given = {
            layer: f for layer, f in (fitters or {}).items() if f.options == options
        }  # fitters built for the same options (e.g. by the sweep) are reused
        self._fitters = given | {
            j.layer: junction_fitter(model, j, self.stats[j.consumer], options)
            for j in self.junctions
            if j.layer not in given
        }
        self.grids = {
            j.layer: [j.num_features]
            + [
                p
                for p in rank_grid(j.num_features, ranks, start=self._fitters[j.layer].rank)
                if p < j.num_features
            ]
            for j in self.junctions
        }
        for layer, grid in self.grids.items():
            self._fitters[layer].prepare(grid[1:])  # the whole grid in one batched selection
        self.evaluator = CachedEvaluator(
            model, self.junctions[0].consumer, eval_data, metric, **self.eval_options
        )
        base_acc, base_energy = baseline or (
            self.evaluator(),
            energy_model.estimate(model, example_input),
        )
        full = {j.layer: j.num_features for j in self.junctions}
        self.baseline = JointPoint(full, base_acc, 0.0, base_energy, 1.0, 1.0, "baseline")
        self._memo: dict[tuple[tuple[str, int], ...], JointPoint] = {}
        # {id(point): (point, {consumer: statistics it was fitted with}, {consumer: (W_p, b_p)}
        # of a compensated re-fit, copied in after the structure is rebuilt)}
        self._fitted: dict[
            int, tuple[JointPoint, dict[str, JunctionStatistics], dict[str, tuple[Tensor, Any]]]
        ] = {}
        self._reductions: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor | None]] = {}
        self._selectors: dict[str, Any] = {}

    # ------------------------------------------------------------ building blocks

    def fitter(self, layer: str) -> JunctionFitter:
        """The fitter of ``layer``'s junction on the original statistics."""
        return self._fitters[layer]

    def _reduction(self, layer: str, p: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Kept indices and the consumer's new weights for one junction, on original stats."""
        key = (layer, p)
        if key not in self._reductions:
            fit = self._fitters[layer].fit(p)
            self._reductions[key] = (fit.kept, fit.weight, fit.bias)
        return self._reductions[key]

    def build(self, config: Mapping[str, int]) -> nn.Module:
        """A reduced copy of the model for ``config``, each junction fitted on original stats.

        Junctions are applied in network order, so each consumer still has its original weight
        when it is re-fitted (a later junction only deletes its output rows).
        """
        reduced = copy.deepcopy(self.model)
        for j in self.junctions:
            p = config.get(j.layer, j.num_features)
            if p < j.num_features:
                kept, W_p, b_p = self._reduction(j.layer, p)
                apply_reduction(reduced, j, kept.to(W_p.device), W_p, b_p)
        return reduced

    def score(
        self, reduced: nn.Module, config: Mapping[str, int], strategy: str,
        kept: Mapping[str, tuple[int, ...]], stats: Mapping[str, JunctionStatistics],
        weights: Mapping[str, tuple[Tensor, Tensor | None]] | None = None,
    ) -> JointPoint:  # fmt: skip
        swaps: dict[str, nn.Module] = {}
        first = self.junctions[0]
        for j in self.junctions:
            if config.get(j.layer, j.num_features) >= j.num_features:
                continue
            for name in j.modules:
                if name != first.consumer and self.evaluator.replaceable(name):
                    swaps[name] = reduced.get_submodule(name)
        c0 = reduced.get_submodule(first.consumer)
        p0 = config.get(first.layer, first.num_features)
        if self.evaluator.cached and p0 < first.num_features and first.kind == "conv":
            # The cache holds all the channels the first consumer read: zero the dropped ones.
            index = torch.as_tensor(kept[first.layer], device=c0.weight.device)
            c0 = full_width_consumer(c0, first.num_features, index, c0.weight, c0.bias)
        elif (
            self.evaluator.cached and p0 < first.num_features and not isinstance(c0, GatheredLinear)
        ):
            # The cache holds the full-width input of the first consumer: gather the kept part.
            c0 = linear_from(
                c0.weight, c0.bias, like=c0, source_features=first.num_features,
                index=torch.as_tensor(kept[first.layer], device=c0.weight.device),
            )  # fmt: skip
        swaps[first.consumer] = c0
        if self.evaluator.cached:
            acc = self.evaluator(modules=swaps)
        else:
            acc = CachedEvaluator(
                reduced,
                first.consumer,
                self.eval_data,
                self.metric,
                cache=False,
                **self.eval_options,
            )()
        energy = self.energy_model.estimate(reduced, self.example_input)
        base = self.baseline
        point = JointPoint(
            config=dict(config), accuracy=acc, energy=energy,
            accuracy_drop=self.evaluator.degradation(base.accuracy, acc),
            energy_ratio=base.energy.energy_ratio(energy),
            memory_ratio=base.energy.memory_ratio(energy),
            strategy=strategy, kept=dict(kept),
        )  # fmt: skip
        return self._record(point, stats, weights)

    def evaluate(self, config: Mapping[str, int], strategy: str = "greedy") -> JointPoint:
        """Build and score ``config`` with every junction fitted on the original statistics."""
        full = {j.layer: config.get(j.layer, j.num_features) for j in self.junctions}
        key = tuple(sorted(full.items()))
        if key not in self._memo:
            kept = {
                layer: tuple(int(i) for i in self._reduction(layer, p)[0].tolist())
                for layer, p in full.items()
                if p < self.by_layer[layer].num_features
            }
            stats = {
                self.by_layer[layer].consumer: self.stats[self.by_layer[layer].consumer]
                for layer in kept
            }
            self._memo[key] = self.score(self.build(full), full, strategy, kept, stats)
        return self._memo[key]

    def fitted_stats(self, point: JointPoint) -> dict[str, JunctionStatistics]:
        """``{consumer: statistics}`` that each reduced junction of ``point`` was fitted with."""
        made, stats, _ = self._fitted.get(id(point), (None, {}, {}))
        if made is not point:
            raise NeuronEliminationError(
                f"the joint point {point.label!r} ({point.strategy}) was not evaluated by this "
                "search"
            )
        return stats

    def apply(self, model: nn.Module, point: JointPoint) -> Elimination:
        """Swap ``point``'s configuration into ``model`` in place, exactly as it was evaluated."""
        reduced = [j for j in self.junctions if point.config[j.layer] < j.num_features]
        if not reduced:
            return Elimination(model, [])
        stats = self.fitted_stats(point)
        result = eliminate_neurons(
            model, {j.target: point.config[j.layer] for j in reduced},
            stats={j.consumer: stats[j.consumer] for j in reduced},
            kept={j.target: point.kept[j.layer] for j in reduced},
            method=self.method, affine=self.affine, ridge=self.ridge, inplace=True,
            junctions=list(self.junctions),
        )  # fmt: skip
        with torch.no_grad():  # the consumer parameters of a compensated re-fit
            for consumer, (W_p, b_p) in self._fitted[id(point)][2].items():
                module = model.get_submodule(consumer)
                module.weight.copy_(W_p)
                if b_p is None:
                    if module.bias is not None:  # evaluated without one: contributes nothing
                        module.bias.zero_()
                elif module.bias is None:  # the fit's intercept needs a bias
                    module.bias = nn.Parameter(
                        b_p.to(module.weight, copy=True), module.weight.requires_grad
                    )
                else:
                    module.bias.copy_(b_p)
        return result

    def _record(
        self,
        point: JointPoint,
        stats: Mapping[str, JunctionStatistics],
        weights: Mapping[str, tuple[Tensor, Tensor | None]] | None = None,
    ) -> JointPoint:
        """Keep what ``point``'s junctions were fitted with (for :meth:`apply`); report it."""
        self._fitted[id(point)] = (point, dict(stats), dict(weights or {}))
        if self.on_point is not None:
            self.on_point(point)
        return point

    def from_sweep(
        self, sp: SweepPoint, config: Mapping[str, int], kept: Mapping[str, tuple[int, ...]],
        stats: Mapping[str, JunctionStatistics],
    ) -> JointPoint:  # fmt: skip
        """The recorded joint point of a sequential sweep's point ``sp``."""
        point = JointPoint(
            config=dict(config), accuracy=sp.accuracy, accuracy_drop=sp.accuracy_drop,
            energy=sp.energy, energy_ratio=sp.energy_ratio, memory_ratio=sp.memory_ratio,
            strategy="sequential", kept=dict(kept),
        )  # fmt: skip
        return self._record(point, stats)

    def statistics(self, model: nn.Module, consumer: str) -> JunctionStatistics:
        """Statistics of ``consumer``'s input in ``model`` (a reduced copy) on ``train_data``."""
        channels = statistics_channels(model, [j for j in self.junctions if j.consumer == consumer])
        return collect_statistics(
            model, [consumer], self.train_data, max_samples=self.max_samples,
            channels=channels, **self.stat_options,
        )[consumer]  # fmt: skip
