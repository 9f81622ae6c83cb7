"""Sequential, streamed fits: one junction at a time, on the network already reduced upstream.

:func:`reduce_streamed` applies a fixed plan ``{layer: p}`` (or one kept fraction for every
junction) without a search. It walks the junctions in network order and, for each,

1. collects the statistics of that consumer only, on the model as it is now (the junctions
   before it already reduced), in one pass over the data that stops right after the consumer
   (:func:`~lightning_neuronprune.core.recording.collect_statistics` with ``stop_early``);
2. selects p features and re-fits the consumer on them
   (:func:`~lightning_neuronprune.search.elimination.reduce_junction`), so that each fit
   absorbs the errors of the junctions before it;
3. swaps the smaller modules in, writes the plan so far, and frees ``G``.

Only one junction's ``G`` (n × n, float64, on the model's device) lives at a time, and without an
intercept it is turned into the second moment in place
(:meth:`~lightning_neuronprune.core.statistics.JunctionStatistics.normalize_`), which the fit
reads without a copy. The peak extra memory is that one matrix with the selection and
least-squares workspace, or during a pass ``G`` and one block's activations; never the
``L · n²`` of collecting every junction's statistics at once. The price is one partial pass over
the data per junction (``L (L + 1) / 2`` block passes for ``L`` junctions in a row of blocks,
about ``L / 2`` full passes).

:func:`run_plan` is what the Lightning callback does with ``apply={layer: p}``: the unreduced
model's metric and energy, :func:`reduce_streamed`, and the reduced model's, as a
:class:`~lightning_neuronprune.search.pipeline.SearchResult`.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.core.runtime import model_device
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.search.decision import Decision
from lightning_neuronprune.search.elimination import Elimination, EliminationRecord, reduce_junction
from lightning_neuronprune.search.evaluation import degradation, metric_direction
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.pipeline import ModelIO, SearchResult
from lightning_neuronprune.search.settings import SearchSettings
from lightning_neuronprune.search.sweep import SweepPoint
from lightning_neuronprune.structure.conv import pads_with_zeros, statistics_channels
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.persistence import read_plan, write_plan
from lightning_neuronprune.structure.surgery import update_config
from lightning_neuronprune.structure.targets import Targets

__all__ = ["plan_widths", "reduce_streamed", "run_plan"]

log = logging.getLogger(__name__)


def plan_widths(
    model: nn.Module, junctions: Sequence[Junction], widths: Mapping[str, int] | float
) -> list[tuple[Junction, int]]:
    """The junctions to reduce and their p, checked, in network order.

    Args:
        model: the network that holds the junctions.
        junctions: the targets (distinct consumers).
        widths: ``{layer: p}`` (a junction may be named by target, canonical layer, any of a
            gated junction's producers, or ``"<consumer>:in"``), or one fraction in (0, 1] of
            every junction's n kept (``ceil(fraction · n)``, at least 1).

    Returns:
        ``[(junction, p), ...]`` of the junctions that change (``p < n``), in the order their
        consumers appear in ``model``.

    Raises:
        JunctionError: no junctions, an unknown or repeated name, a p that is not an integer in
            [1, n], or a fraction outside (0, 1].
    """
    if not junctions:
        raise JunctionError("`junctions` is empty: nothing to reduce")
    targets = junctions if isinstance(junctions, Targets) else Targets(junctions)
    if isinstance(widths, Mapping):
        if not widths:
            raise JunctionError("`widths` is an empty mapping: give {layer: p}")
        layers = targets.canonical(widths, "`widths`")
        twice = sorted({layer for layer in layers if layers.count(layer) > 1})
        if twice:
            raise JunctionError(f"`widths` names the junction(s) {twice} more than once")
        ps = dict(zip(layers, widths.values(), strict=True))
        for (name, p), layer in zip(widths.items(), layers, strict=True):
            n = targets[layer].num_features
            if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 1 <= p <= n:
                raise JunctionError(
                    f"`widths` gives {name!r} p={p!r}, but it must be an integer in [1, {n}] "
                    f"(the junction has n={n} features)"
                )
    elif isinstance(widths, numbers.Real) and not isinstance(widths, bool):
        if not (math.isfinite(widths) and 0 < widths <= 1):
            raise JunctionError(f"`widths` as a fraction must lie in (0, 1], got {widths!r}")
        ps = {j.layer: max(1, math.ceil(widths * j.num_features)) for j in targets}
    else:
        raise JunctionError(
            f"`widths` must be a mapping {{layer: p}} or a fraction in (0, 1], got {widths!r}"
        )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [j.consumer for j in targets if j.consumer not in order]
    if missing:
        raise JunctionError(f"the consumers {missing} are not modules of the model")
    plan = [(j, int(ps[j.layer])) for j in targets if j.layer in ps]
    plan = [(j, p) for j, p in plan if p < j.num_features]
    return sorted(plan, key=lambda jp: order[jp[0].consumer])


def reduce_streamed(
    model: nn.Module,
    junctions: Sequence[Junction],
    widths: Mapping[str, int] | float,
    data: Iterable[Any],
    options: FitOptions | None = None,
    *,
    max_samples: int | None = None,
    io: ModelIO | None = None,
) -> Elimination:
    """Reduce ``model`` in place, junction by junction, each fitted on the network reduced
    upstream, with one junction's statistics in memory at a time.

    For each junction in network order: ``G = Σ x xᵀ`` (n × n, float64, on ``io.device`` or the
    model's device) of its consumer's input on the model as reduced so far, over one pass of
    ``data`` that stops right after the consumer; the p kept features ``S`` and the consumer's
    new weight ``W_p = W G[:, S] G[S, S]⁻¹``
    (:func:`~lightning_neuronprune.search.elimination.reduce_junction`); the surgery; then ``G``
    is freed before the next junction's pass. Under ``torch.distributed`` each junction's
    statistics are all-reduced, so every rank makes the same reduction.

    Everything is checked before the first surgery: a bad width or option leaves the model
    untouched. The plan (:mod:`~lightning_neuronprune.structure.persistence`) is written after
    every junction, so a model whose data fail part-way (no samples, non-finite activations)
    still reloads with the junctions reduced so far.

    Args:
        model: the trained network; modified in place.
        junctions: the targets (from
            :func:`~lightning_neuronprune.structure.targets.resolve_targets` or
            :func:`~lightning_neuronprune.structure.discovery.find_junction`).
        widths: ``{layer: p}`` or one kept fraction for every junction (see :func:`plan_widths`).
        data: batches for the statistics (iterated once per junction).
        options: selection and least-squares options (default the paper's ``svd_qr``).
        max_samples: samples per pass (per process).
        io: the device, batch transfer, forward context, ``input_fn`` and ``mask_fn``, and the
            progress reporting (``info`` lines and a bar over the junctions); by default the
            model's own device and no progress.

    Returns:
        :class:`~lightning_neuronprune.search.elimination.Elimination` ``(model, records)``, one
        record per reduced junction, in network order.

    Raises:
        JunctionError: bad ``widths`` (see :func:`plan_widths`), or an intercept asked of a
            conv consumer that pads with zeros.
        ValueError: ``options`` is not a :class:`FitOptions`, or ``max_samples`` is not a
            positive integer.
        StatisticsError: no sample reached a consumer, or its input is not finite.
    """
    if options is None:
        options = FitOptions()
    if not isinstance(options, FitOptions):
        raise ValueError(f"`options` must be a FitOptions or None, got {options!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples!r}")
    plan = plan_widths(model, junctions, widths)
    if options.affine:
        for j, _ in plan:
            if j.kind == "conv" and pads_with_zeros(model.get_submodule(j.consumer)):
                raise JunctionError(
                    f"consumer {j.consumer!r} of {j.layer!r} pads with zeros: no intercept "
                    "(`affine=True`) fits it; use affine=False"
                )
    io = io or ModelIO(device=model_device(model))
    previous = read_plan(model)
    records: list[EliminationRecord] = []
    with io.progress("Neuron elimination: streamed fits", len(plan), "junctions") as bar:
        for i, (j, p) in enumerate(plan, 1):
            started = time.perf_counter()
            stats = collect_statistics(
                model, [j.consumer], data, max_samples=max_samples, input_fn=io.input_fn,
                mask_fn=io.mask_fn, device=io.device, channels=statistics_channels(model, [j]),
                stop_early=True, **io.forward_kwargs(),
            )[j.consumer]  # fmt: skip
            collected = time.perf_counter()
            moment = None
            if not options.affine and j.kind != "conv":  # G becomes the moment: no copy of it
                moment = stats.normalize_().gram
            record = reduce_junction(
                model, j, stats, p, method=options.method, affine=options.affine,
                ridge=options.ridge, moment=moment,
            )  # fmt: skip
            del stats, moment  # free G before the next junction's pass
            records.append(record)
            write_plan(model, previous + [r.as_dict() for r in records])
            bar.advance()
            io.info(
                f"neuron elimination [{i}/{len(plan)}] {j.layer}: kept {p} of "
                f"{j.num_features} (statistics {collected - started:.1f}s, fit "
                f"{time.perf_counter() - collected:.1f}s)"
            )
            log.debug("streamed fit of %s: kept %d of %d", j.layer, p, j.num_features)
    if records:
        update_config(model, read_plan(model))
    return Elimination(model, records)


def run_plan(
    model: nn.Module,
    junctions: Sequence[Junction],
    settings: SearchSettings,
    energy_model: EnergyModel,
    eval_data: Iterable[Any],
    metric: Any,
    example: Any,
    train_data: Iterable[Any],
    io: ModelIO | None = None,
) -> tuple[SearchResult, Elimination]:
    """Apply ``settings.apply``, a fixed ``{layer: p}``, with :func:`reduce_streamed`, and
    measure the model before and after: no sweep, no joint search, no held-out confirmation.

    The result's ``points`` hold each junction's unreduced baseline only; ``joint_points`` and
    ``decision.chosen`` hold one :class:`~lightning_neuronprune.search.joint.JointPoint`
    (strategy ``"streamed"``) with the reduced model's metric, degradation and energy. A relative
    budget becomes absolute on the unreduced metric; a plan that degrades the metric beyond it
    is applied all the same, with a warning (``io.warn``).

    Returns:
        ``(result, elimination)``; ``result.applied`` is true when some junction changed.
    """
    if not isinstance(settings.apply, Mapping):
        raise ValueError(f"`apply` must be a mapping {{layer: p}} here, got {settings.apply!r}")
    io = io or ModelIO(device=model_device(model))
    targets = junctions if isinstance(junctions, Targets) else Targets(junctions)
    plan = plan_widths(model, targets, settings.apply)  # checked before any forward pass
    first = targets[0].consumer

    def measure() -> tuple[float, Any]:
        value = float(io.evaluator(model, first, eval_data, metric, cache=False)())
        return value, energy_model.estimate(model, example)

    base, base_energy = measure()
    settings = settings.absolute(base)
    io.info(f"neuron elimination: baseline metric {base:.4f}; streamed fits of {len(plan)} layers")
    points = {
        j.layer: [SweepPoint(j.layer, n, n, base, 0.0, base_energy, 1.0, 1.0, tuple(range(n)))]
        for j in targets
        for n in (j.num_features,)
    }
    elimination = reduce_streamed(
        model, targets, {j.layer: p for j, p in plan}, train_data, settings.options,
        max_samples=settings.max_samples, io=io,
    ) if plan else Elimination(model, [])  # fmt: skip
    value, energy = measure()
    kept = {r.layer: r.kept for r in elimination.records}
    point = JointPoint(
        config={j.layer: j.num_features for j in targets} | {j.layer: p for j, p in plan},
        accuracy=value, accuracy_drop=degradation(base, value, metric_direction(metric)),
        energy=energy, energy_ratio=base_energy.energy_ratio(energy),
        memory_ratio=base_energy.memory_ratio(energy), strategy="streamed", kept=kept,
    )  # fmt: skip
    io.info(
        f"neuron elimination [streamed] {point.label}: metric {value:.4f} (drop "
        f"{point.accuracy_drop:+.4f}), energy {point.energy_ratio:.2f}× lower"
    )
    if point.accuracy_drop > settings.max_degradation:
        io.warn(
            f"neuron elimination: the plan {dict(settings.apply)} degrades the metric by "
            f"{point.accuracy_drop:.4g}, beyond the budget {settings.max_degradation:.4g}; it is "
            "applied as asked"
        )
    decision = Decision(point, {j.layer: p for j, p in plan}, kept)
    result = SearchResult(
        points, [point], decision, budget=settings.max_degradation, applied=bool(plan)
    )
    return result, elimination
