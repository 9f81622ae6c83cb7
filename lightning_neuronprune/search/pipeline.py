"""The search after the statistics, without a Trainer: sweeps, joint search, the decision, its
held-out confirmation, and applying it.

This is the functional core's whole pipeline for junctions whose statistics are collected
(:func:`~lightning_neuronprune.core.recording.collect_statistics`)::

    search = ReductionSearch(model, junctions, stats, EnergyModel(), SearchSettings())
    result = search.run(eval_batches, metric, example, train_data=train_batches)  # decides
    search.apply(model, result.decision)                                         # acts

:meth:`ReductionSearch.run` only measures and decides: every configuration is evaluated on a
temporarily swapped layer or a copy, so the model leaves it as it came in.
:meth:`ReductionSearch.apply` only acts. The two are apart, as in Lightning's ``EarlyStopping``,
so that a caller can report the decision before the model changes. The Lightning callback
(:class:`~lightning_neuronprune.lightning.callback.NeuronEliminationCallback`) is a shell around
this
class. It finds the loaders, the device and the precision plugin's hooks, draws progress bars
in the Trainer's style, and writes the reports and checkpoints.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_neuronprune.core.fitting import JunctionFitter
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.cost.energy import EnergyModel, EnergyReport
from lightning_neuronprune.errors import StatisticsError
from lightning_neuronprune.search.confirmation import (
    Confirmation,
    chunk_batches,
    confirm_front,
    front_within,
    split_batches,
)
from lightning_neuronprune.search.decision import Decision, apply_decision, decide, decision_for
from lightning_neuronprune.search.elimination import Elimination
from lightning_neuronprune.search.evaluation import CachedEvaluator, metric_direction
from lightning_neuronprune.search.joint import JointPoint, JointSearch
from lightning_neuronprune.search.pareto import point_label
from lightning_neuronprune.search.progress import Bar, no_progress
from lightning_neuronprune.search.sensitivity import proxy_sensitivity
from lightning_neuronprune.search.settings import SearchSettings
from lightning_neuronprune.search.strategies import allocate, greedy, sequential
from lightning_neuronprune.search.sweep import SweepPoint, rank_grid, sweep_junction
from lightning_neuronprune.structure.conv_fit import junction_fitter
from lightning_neuronprune.structure.junction import Junction

__all__ = ["ModelIO", "ReductionSearch", "SearchResult"]


@dataclass(frozen=True)
class ModelIO:
    """How batches reach the model and the metric, and how the search talks to the user.

    Attributes:
        device: where evaluation runs.
        transfer: maps a batch to the device (the Trainer's ``batch_to_device``).
        forward_context: what forward passes run under (the precision plugin's).
        input_fn, target_fn, output_fn, mask_fn: the batch adapters (see
            :class:`~lightning_neuronprune.search.evaluation.CachedEvaluator` and
            :func:`~lightning_neuronprune.core.recording.collect_statistics`).
        loss_fn: the loss of the allocate strategy's ``"loss"`` proxy (see
            :func:`~lightning_neuronprune.search.sensitivity.default_loss`).
        info: takes a line of progress text (silent by default).
        warn: takes a warning (default :func:`warnings.warn`).
        progress: ``(description, total, unit) -> context manager of a bar`` with ``update``
            and ``advance`` (no bar by default).
    """

    device: torch.device | str = "cpu"
    transfer: Callable[[Any], Any] | None = None
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None
    input_fn: Callable[[Any], Any] | None = None
    target_fn: Callable[[Any], Any] | None = None
    output_fn: Callable[[Any], Any] | None = None
    mask_fn: Callable[[Any], Any] | None = None
    loss_fn: Callable[[Any, Any], Any] | None = None
    info: Callable[[str], None] = lambda message: None
    warn: Callable[[str], None] = warnings.warn
    progress: Callable[[str, int | None, str], AbstractContextManager[Bar]] = no_progress

    def forward_kwargs(self) -> dict[str, Any]:
        """``transfer`` and ``forward_context``."""
        return {"transfer": self.transfer, "forward_context": self.forward_context}

    def eval_fns(self) -> dict[str, Any]:
        """The adapters of an evaluation."""
        return {"input_fn": self.input_fn, "target_fn": self.target_fn, "output_fn": self.output_fn}

    def evaluator(
        self, model: nn.Module, consumer: str, data: Iterable[Any], metric: Any, **kwargs: Any
    ) -> CachedEvaluator:
        """A :class:`~lightning_neuronprune.search.evaluation.CachedEvaluator` run this way."""
        return CachedEvaluator(
            model, consumer, data, metric, device=self.device, **self.forward_kwargs(),
            **self.eval_fns(), **kwargs,
        )  # fmt: skip


@dataclass(frozen=True)
class SearchResult:
    """Everything :meth:`ReductionSearch.run` measured and decided: numbers, no statistics.

    Attributes:
        points: ``{layer: [SweepPoint, ...]}``, each sweep from its baseline down.
        joint_points: the joint search's points, in the order evaluated.
        decision: what to apply (after the confirmation, when there is one).
        confirmations: the candidates re-measured on the held-out part, in the order tried.
        budget: the budget that was applied, in the metric's units (a relative budget times the
            unreduced model's metric on the search part).
        applied: whether the decision was applied to the model (set by whoever applies it).
    """

    points: Mapping[str, list[SweepPoint]]
    joint_points: list[JointPoint]
    decision: Decision
    confirmations: list[Confirmation[Any]] = field(default_factory=list)
    budget: float = 0.0
    applied: bool = False

    @property
    def every(self) -> list[SweepPoint]:
        """Every single-layer point, layer by layer."""
        return [pt for pts in self.points.values() for pt in pts]


class ReductionSearch:
    """Sweeps, joint search, decision and confirmation for the junctions of one model.

    Args:
        model: the trained network; :meth:`run` leaves it unchanged.
        junctions: the targets, in network order.
        stats: ``{consumer: statistics}`` of every junction.
        energy_model: prices each configuration.
        settings: what to search and how to choose.
        io: how batches reach the model, and where progress goes.

    Raises:
        ValueError: no junctions, or ``settings`` is not a :class:`SearchSettings`.
        StatisticsError: a junction's consumer has no statistics in ``stats``.
    """

    def __init__(
        self,
        model: nn.Module,
        junctions: Sequence[Junction],
        stats: Mapping[str, JunctionStatistics],
        energy_model: EnergyModel,
        settings: SearchSettings,
        io: ModelIO | None = None,
    ) -> None:
        if not junctions:
            raise ValueError("`junctions` is empty: nothing to search")
        if not isinstance(settings, SearchSettings):
            raise ValueError(f"`settings` must be a SearchSettings, got {settings!r}")
        missing = [j.consumer for j in junctions if j.consumer not in stats]
        if missing:
            raise StatisticsError(
                f"no statistics for the consumers {missing}; `stats` has {sorted(stats)}"
            )
        self.model = model
        self.junctions = list(junctions)
        self.stats = stats
        self.energy_model = energy_model
        self.settings = settings
        self.io = io or ModelIO()
        self._joint: JointSearch | None = None
        self._base: tuple[float, EnergyReport] | None = None

    def run(
        self,
        eval_data: Iterable[Any],
        metric: Any,
        example: Any,
        *,
        train_data: Iterable[Any] | None = None,
    ) -> SearchResult:
        """Measure every configuration and decide.

        Args:
            eval_data: evaluation batches. With a confirmation, they are split by
                :func:`~lightning_neuronprune.search.confirmation.split_batches` into a search part
                and
                a held-out part.
            metric: a ``torchmetrics.Metric`` over ``(predictions, target)``.
            example: one input for the energy model.
            train_data: batches for statistics that the joint search re-collects.

        Returns:
            The :class:`SearchResult`. The joint search is kept until :meth:`apply`, which
            applies a joint point exactly as it was fitted.
        """
        s, say = self.settings, self.io.info
        held_out = None
        # Only the choice of "max_energy_saving" is confirmed: with a fixed {layer: p} or no
        # application, every evaluation sample serves the search.
        if s.confirm is not None and s.confirm.fraction and s.apply == "max_energy_saving":
            eval_data, held_out = split_batches(eval_data, s.confirm.fraction)
            say(
                f"neuron elimination: {1 - s.confirm.fraction:.0%} of the evaluation samples "
                f"for the search, {s.confirm.fraction:.0%} held out to confirm the choice"
            )
        fitters = {
            j.layer: junction_fitter(self.model, j, self.stats[j.consumer], s.options)
            for j in self.junctions
        }  # per-tap channel fitters for conv junctions
        try:
            if s.joint is not None and s.joint.strategy == "allocate":
                # no per-layer sweeps (a full pass per grid point): each layer's baseline only
                first = self.junctions[0].consumer
                acc, energy = self._baseline(
                    self.io.evaluator(self.model, first, eval_data, metric), example
                )
                points = {
                    j.layer: [
                        SweepPoint(j.layer, n, n, acc, 0.0, energy, 1.0, 1.0, tuple(range(n)))
                    ]
                    for j in self.junctions
                    for n in (j.num_features,)
                }
            else:
                points = self._sweep(fitters, eval_data, metric, example)
            joint_points = self._joint_search(
                fitters, points, eval_data, train_data, metric, example
            )
        finally:
            fitters.clear()  # n × n matrices per junction; the joint search keeps what it needs
        s = self.settings  # the budget in the metric's units, from the sweep's baseline on
        every = [pt for pts in points.values() for pt in pts]
        decision = decide(every, joint_points, self.junctions, s.apply, s.max_degradation)
        if s.apply is not None and not isinstance(s.apply, Mapping) and not decision.plan:
            self.io.warn(
                f"neuron elimination: no configuration keeps the metric's degradation within "
                f"{s.max_degradation}; the model is left unchanged"
            )
        confirmations: list[Confirmation[Any]] = []
        if held_out is not None and s.apply == "max_energy_saving" and decision.plan:
            decision, confirmations = self._confirm(every, joint_points, held_out, metric)
        return SearchResult(points, joint_points, decision, confirmations, budget=s.max_degradation)

    def apply(self, model: nn.Module, decision: Decision) -> Elimination:
        """Apply ``decision`` to ``model`` in place, exactly as it was evaluated, and release
        the joint search."""
        try:
            return self._apply(model, decision)
        finally:
            self.close()

    def close(self) -> None:
        """Release the joint search (its reduced copies and fitted statistics)."""
        self._joint = None

    # ------------------------------------------------------------------ steps

    def _sweep(
        self, fitters: Mapping[str, JunctionFitter], data: Iterable[Any], metric: Any,
        example: Any,
    ) -> dict[str, list[SweepPoint]]:  # fmt: skip
        s, say = self.settings, self.io.info
        grids = {
            j.layer: rank_grid(j.num_features, s.ranks, start=fitters[j.layer].rank)
            for j in self.junctions
        }
        # one point for the baseline of each layer, then its grid below n
        sizes = [1 + sum(p != j.num_features for p in grids[j.layer]) for j in self.junctions]
        points: dict[str, list[SweepPoint]] = {}
        baseline = None
        with self.io.progress("Neuron elimination: sweep", sum(sizes), "points") as bar:
            for i, j in enumerate(self.junctions, 1):
                evaluator = self.io.evaluator(self.model, j.consumer, data, metric)
                if baseline is None:
                    baseline = self._baseline(evaluator, example)
                    s = self.settings

                def progress(pt: SweepPoint, i: int = i) -> None:
                    bar.advance()
                    say(
                        f"neuron elimination [{i}/{len(self.junctions)}] {pt.layer}: "
                        f"p={pt.p}/{pt.n} accuracy {pt.accuracy:.4f} (drop "
                        f"{pt.accuracy_drop:+.4f}), energy {pt.energy_ratio:.2f}× lower"
                    )

                points[j.layer] = sweep_junction(
                    self.model, j, self.stats[j.consumer], evaluator, self.energy_model,
                    example, ranks=s.ranks, options=s.options, fitter=fitters[j.layer],
                    max_accuracy_drop=s.max_degradation, baseline=baseline, on_point=progress,
                )  # fmt: skip
                bar.update(sum(sizes[:i]))  # the points after an early stop are skipped
        return points

    def _baseline(self, evaluator: CachedEvaluator, example: Any) -> tuple[float, EnergyReport]:
        """The unreduced model's metric and energy; a relative budget becomes absolute."""
        s, say = self.settings, self.io.info
        baseline = (float(evaluator()), self.energy_model.estimate(self.model, example))
        self._base = baseline
        say(
            f"neuron elimination: baseline metric {baseline[0]:.4f}, energy "
            f"{baseline[1].total * 1e6:.3f} µJ"
        )
        if s.relative:
            s = self.settings = s.absolute(baseline[0])
            say(f"neuron elimination: budget {s.max_degradation:.4g} in metric units")
        return baseline

    def _joint_search(
        self, fitters: Mapping[str, JunctionFitter], points: Mapping[str, list[SweepPoint]],
        data: Iterable[Any], train_data: Iterable[Any] | None, metric: Any, example: Any,
    ) -> list[JointPoint]:  # fmt: skip
        """Run the joint strategy; keep its :class:`~lightning_neuronprune.search.joint.JointSearch`
        for :meth:`apply`."""
        s, o, say = self.settings, self.settings.options, self.io.info
        self._joint = None
        if s.joint is None or (len(self.junctions) < 2 and s.joint.strategy != "allocate"):
            return []
        layers, name = [j.layer for j in self.junctions], s.joint.strategy
        say(f"neuron elimination: joint search ({name}) over {layers}")
        bar = self.io.progress(f"Neuron elimination: joint search ({name})", None, "points")
        with bar as b:

            def progress(pt: JointPoint) -> None:
                b.advance()
                say(
                    f"neuron elimination [joint {name}] {pt.label}: metric "
                    f"{pt.accuracy:.4f} (drop {pt.accuracy_drop:+.4f}), energy "
                    f"{pt.energy_ratio:.2f}× lower"
                )

            ranks = s.ranks
            if name == "allocate" and s.joint.multiple is not None:  # select only those widths
                m, widest = s.joint.multiple, max(j.num_features for j in self.junctions)
                ranks = list(range(m, widest, m)) or [widest]
            self._joint = JointSearch(
                self.model, self.junctions, self.stats, data, metric, self.energy_model, example,
                train_data=train_data, method=o.method, affine=o.affine, ridge=o.ridge,
                ranks=ranks, max_samples=s.max_samples, on_point=progress,
                baseline=self._base, fitters=fitters,
                **self.io.forward_kwargs(),
                data_fns={**self.io.eval_fns(), "mask_fn": self.io.mask_fn},
            )  # fmt: skip
            if name == "allocate":
                j = s.joint
                sensitivity = None
                if j.proxy == "loss" and not j.uniform:
                    say(f"neuron elimination: loss sensitivity ({j.proxy_rows} rows)")
                    sensitivity = proxy_sensitivity(
                        self.model, [x.consumer for x in self.junctions],
                        [d for d in (train_data, data) if d is not None], metric,
                        j.proxy_rows, loss_fn=self.io.loss_fn,
                        warn=self.io.warn, **self.io.eval_fns(), **self.io.forward_kwargs(),
                    )  # fmt: skip
                return allocate(
                    self._joint, s.max_degradation, uniform=j.uniform, multiple=j.multiple,
                    max_evaluations=j.max_evaluations, sensitivity=sensitivity,
                )  # fmt: skip
            if name == "greedy":
                return greedy(
                    self._joint, s.max_degradation, compensate=s.joint.compensate,
                    slack=s.max_degradation / 2,
                )  # fmt: skip
            return sequential(
                self._joint, s.max_degradation, order=s.joint.order, shares=s.joint.shares
            )

    def _confirm(
        self, every: list[SweepPoint], joint_points: list[JointPoint], held_out: list[Any],
        metric: Any,
    ) -> tuple[Decision, list[Confirmation[Any]]]:  # fmt: skip
        """Re-measure the candidates on the held-out part, from the lowest energy up, and keep
        the first whose drop there (or its upper confidence bound) stays within the budget less
        its reserve and margin."""
        s, c = self.settings, self.settings.confirm
        assert c is not None  # run() confirms only with settings
        candidates: list[SweepPoint | JointPoint] = [pt for pt in every if pt.p < pt.n]
        candidates += [pt for pt in joint_points if pt.strategy != "baseline"]
        first = self.junctions[0].consumer
        chunks = chunk_batches(held_out, c.chunk) if c.confidence else []

        def evaluate(module: nn.Module) -> Any:
            if not c.confidence:
                return self.io.evaluator(module, first, held_out, metric, cache=False)()
            # one pass: each chunk's outputs also update a metric of the whole held-out part
            whole = _Whole(metric)
            per_chunk = [self.io.evaluator(module, first, b, whole, cache=False)() for b in chunks]
            return float(whole.total.compute()), per_chunk

        def measure(pt: SweepPoint | JointPoint) -> Any:
            reduced = copy.deepcopy(self.model)
            self._apply(reduced, decision_for(pt, self.junctions))
            return evaluate(reduced)

        chosen, tried = confirm_front(
            front_within(candidates, s.max_degradation), measure, evaluate(self.model),
            s.max_degradation * (1 - c.reserve), higher_is_better=metric_direction(metric),
            margin=c.margin,
            confidence=c.confidence, max_tries=c.max_tries,
        )  # fmt: skip
        for t in tried:
            bound = "" if t.upper_bound is None else f" (upper bound {t.upper_bound:+.4f})"
            self.io.info(
                f"neuron elimination [confirm] {point_label(t.point)}: drop "
                f"{t.search_drop:+.4f} on the search part, {t.confirmed_drop:+.4f} held out{bound}"
                " -> " + ("kept" if t.held else "rejected")
            )
        if chosen is None:
            self.io.warn(
                f"neuron elimination: no configuration within the budget "
                f"{s.max_degradation} on the search part kept it on the held-out part "
                f"({len(tried)} tried); the model is left unchanged"
            )
            return Decision(), tried
        return decision_for(chosen, self.junctions), tried

    def _apply(self, model: nn.Module, decision: Decision) -> Elimination:
        if isinstance(decision.chosen, JointPoint) and self._joint is not None:
            return self._joint.apply(model, decision.chosen)
        return apply_decision(model, self.junctions, decision, self.stats, self.settings.options)


class _Whole:
    """A metric that also accumulates into ``total`` (a reset copy of ``metric``) every update
    between its own resets: chunk by chunk, one pass gives each chunk's value and the whole's."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.total = copy.deepcopy(metric)
        self.total.reset()
        self.higher_is_better = metric_direction(metric)

    def reset(self) -> None:
        self.metric.reset()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.metric.update(*args, **kwargs)
        self.total.update(*args, **kwargs)

    def compute(self) -> Any:
        return self.metric.compute()
