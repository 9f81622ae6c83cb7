"""``eliminate_neurons``: statistics → selection → least squares → surgery, for one or more
layers."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.fitting import FitOptions, fit_junction
from lightning_neuronprune.core.reconstruction import least_squares_transform, reconstruct_consumer
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.core.selection import Method
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.errors import JunctionError, StatisticsError
from lightning_neuronprune.structure.conv import statistics_channels
from lightning_neuronprune.structure.conv_fit import channel_fitter
from lightning_neuronprune.structure.discovery import find_junction
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.persistence import read_plan, write_plan
from lightning_neuronprune.structure.surgery import apply_reduction, update_config

__all__ = ["Elimination", "EliminationRecord", "eliminate_neurons", "reduce_junction"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EliminationRecord:
    """What one elimination did: enough, as plain data, to rebuild the reduced shapes.

    Attributes:
        target: the name the user gave.
        kind: ``"producer"``, ``"gated"``, ``"gather"`` or ``"conv"``.
        producer: the layer whose output neurons were removed (a gated junction's first
            producer), or ``None``.
        consumer: the layer whose weights were re-fitted.
        batchnorm: a sliced ``BatchNorm1d`` (or ``BatchNorm2d``) between them, or ``None``.
        n: features (channels of a conv junction) before.
        p: features kept.
        kept: sorted indices of the kept features.
        method: the selection method.
        affine: whether an intercept was fitted.
        ridge: the ridge parameter.
        consumer_bias: whether the new consumer has a bias.
        producers: every layer whose rows were removed (``(producer,)``, or a gated junction's
            producers).
        fused: a gated junction's one producer holds both halves (rows j and n + j).
    """

    target: str
    kind: str
    producer: str | None
    consumer: str
    batchnorm: str | None
    n: int
    p: int
    kept: tuple[int, ...] = field(repr=False)
    method: str = "svd_qr"
    affine: bool = False
    ridge: float = 0.0
    consumer_bias: bool = True
    producers: tuple[str, ...] = ()
    fused: bool = False

    @property
    def layer(self) -> str:
        return self.producer if self.producer is not None else f"{self.consumer}:in"

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules the elimination replaced."""
        producers = self.producers or tuple(filter(None, [self.producer]))
        return (*producers, *filter(None, [self.batchnorm]), self.consumer)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, bool, list): safe for ``torch.load(weights_only=True)``."""
        return {
            "target": self.target,
            "kind": self.kind,
            "producer": self.producer,
            "consumer": self.consumer,
            "batchnorm": self.batchnorm,
            "n": self.n,
            "p": self.p,
            "kept": list(self.kept),
            "method": self.method,
            "affine": self.affine,
            "ridge": float(self.ridge),
            "consumer_bias": self.consumer_bias,
            "producers": list(self.producers),
            "fused": self.fused,
        }


class Elimination(NamedTuple):
    """The result of :func:`eliminate_neurons`: the reduced model and one record per junction."""

    model: nn.Module
    records: list[EliminationRecord]


def _validate_p(junction: Junction, p: Any) -> int:
    n = junction.num_features
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= n:
        raise JunctionError(
            f"`p` for layer {junction.target!r} must be an integer in [1, {n}] (it has n={n} "
            f"features), got {p!r}"
        )
    return p


def reduce_junction(
    model: nn.Module,
    junction: Junction,
    stats: JunctionStatistics,
    p: int,
    *,
    method: Method = "svd_qr",
    affine: bool = False,
    ridge: float = 0.0,
    kept: Tensor | None = None,
    moment: Tensor | None = None,
) -> EliminationRecord:
    """Reduce one junction of ``model`` in place, from its statistics.

    Args:
        model: holds the junction; modified in place.
        junction: from :func:`~lightning_neuronprune.structure.discovery.find_junction`.
        stats: statistics of the consumer's n input features.
        p: features to keep.
        method: ``"svd_qr"``, ``"qr"`` or ``"output"`` (output-aware, uses the consumer's weight).
        affine: fit an intercept, folded into the consumer's bias.
        ridge: relative ridge parameter of the least-squares fit.
        kept: use these kept indices instead of selecting (e.g. from a baseline).
        moment: ``stats.second_moment(centered=affine)`` if already computed, used as it is
            rather than copied (not for conv junctions, whose fit is per channel).

    Returns:
        The :class:`EliminationRecord`.
    """
    if stats.num_features != junction.num_features:
        hint = (
            f" channels (collect them with `channels={{{junction.consumer!r}: "
            f"{junction.num_features}}}`, see `statistics_channels`)"
            if junction.kind == "conv"
            else ""
        )
        raise StatisticsError(
            f"statistics for {junction.consumer!r} have {stats.num_features} features, but the "
            f"layer reads {junction.num_features}{hint}"
        )
    consumer = model.get_submodule(junction.consumer)
    options = FitOptions(method=method, affine=affine, ridge=ridge)
    if junction.kind == "conv":  # the consumer's every tap re-fitted (structure.conv)
        fitter = channel_fitter(model, junction, stats, options)
        if kept is None:
            kept, W_p, b_p, _ = fitter.fit(p)
        else:
            kept = torch.sort(kept.to(device=stats.device, dtype=torch.long)).values
            _, W_p, b_p, _ = fitter.refit(kept)
    elif kept is None:
        kept, W_p, b_p, _ = fit_junction(stats, consumer.weight, consumer.bias, p, options, moment)
    else:
        kept = torch.sort(kept.to(device=stats.device, dtype=torch.long)).values
        rec = least_squares_transform(stats, kept, affine=affine, ridge=ridge, moment=moment)
        W_p, b_p = reconstruct_consumer(consumer.weight, consumer.bias, rec)
    apply_reduction(model, junction, kept, W_p, b_p)
    return EliminationRecord(
        target=junction.target,
        kind=junction.kind,
        producer=junction.producer,
        consumer=junction.consumer,
        batchnorm=junction.batchnorm,
        n=junction.num_features,
        p=int(kept.numel()),
        kept=tuple(int(i) for i in kept.tolist()),
        method=method,
        affine=affine,
        ridge=float(ridge),
        consumer_bias=b_p is not None,
        producers=junction.producers,
        fused=junction.fused,
    )


def _stats_for(
    stats: Mapping[str, JunctionStatistics] | JunctionStatistics | None, junction: Junction
) -> JunctionStatistics | None:
    if stats is None:
        return None
    if isinstance(stats, JunctionStatistics):
        return stats
    for key in (junction.consumer, junction.target, junction.layer):
        if key in stats:
            return stats[key]
    return None


def eliminate_neurons(
    model: nn.Module,
    layer: str | Mapping[str, int],
    p: int | None = None,
    data: Iterable[Any] | None = None,
    *,
    stats: Mapping[str, JunctionStatistics] | JunctionStatistics | None = None,
    method: Method = "svd_qr",
    affine: bool = False,
    ridge: float = 0.0,
    inplace: bool = False,
    consumer: str | None = None,
    max_samples: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    kept: Mapping[str, Sequence[int] | Tensor] | None = None,
    transfer: Callable[[Any], Any] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    mask_fn: Callable[[Any], Tensor | None] | None = None,
    example: Any = None,
    junctions: Sequence[Junction] | None = None,
) -> Elimination:
    """Remove redundant neurons of one or more ``nn.Linear`` layers, without retraining.

    For each target, the consumer's input statistics ``G`` are collected from ``data`` (or taken
    from ``stats``), p features are selected
    (:func:`~lightning_neuronprune.core.selection.select_neurons`),
    the consumer is re-fitted by least squares, ``W_p = W G[:, S] G[S, S]⁻¹``
    (:mod:`~lightning_neuronprune.core.reconstruction`), and smaller modules are swapped in.

    Several targets (``{layer: p}``) are reduced one after another in network order. With
    ``data``, each later junction's statistics are collected on the network reduced so far, so
    that its fit compensates earlier errors.

    Args:
        model: the trained network. Unchanged unless ``inplace``.
        layer: a target name (``"fc1"`` for fc1's output neurons, ``"fc1:in"`` for its input
            features), or a mapping ``{target: p}``.
        p: features to keep, when ``layer`` is a single name.
        data: an iterable of batches for the statistics.
        stats: precomputed statistics, keyed by consumer (or target) name, as returned by
            :func:`~lightning_neuronprune.core.recording.collect_statistics`.
        method: ``"svd_qr"`` (the paper's Algorithm 2), ``"qr"`` (nested pivoted Cholesky) or
            ``"output"`` (output-aware greedy on the consumer's weight and ``G``).
        affine: also fit an intercept, folded into the consumer's bias.
        ridge: relative ridge parameter λ of the fit (``λ · mean(diag G[S, S])`` is added).
        inplace: modify ``model`` itself instead of a deep copy.
        consumer: the consumer's name, when a single target's consumer cannot be traced.
        max_samples: cap on the samples used for statistics.
        input_fn: maps a batch to the model input (see
            :func:`~lightning_neuronprune.core.batches.batch_input`).
        kept: ``{target: indices}`` to keep instead of selecting them (e.g. a sweep's choice or
            a baseline's); p must equal ``len(indices)``. The weights are still re-fitted.
        transfer, forward_context: how batches reach the model (e.g. converted to a
            ``bfloat16`` model's dtype) and what its forward passes run under; see
            :func:`~lightning_neuronprune.core.recording.collect_statistics`.
        mask_fn: maps a batch to its padding mask (see
            :func:`~lightning_neuronprune.core.batches.batch_mask`).
        example: one model input (a few samples) to find the junctions by probing
            (:class:`~lightning_neuronprune.structure.probe.JunctionProbe`) rather than by tracing
            only;
            needed for models that :mod:`torch.fx` cannot trace.
        junctions: junctions already resolved (by :func:`~lightning_neuronprune.structure.discovery.
            find_junction`), matched to the targets by their ``target``; the others are resolved
            here.

    Returns:
        :class:`Elimination` ``(model, records)``. The model also carries the records as plain
        data in its ``neuron_elimination_plan`` buffer (see
        :mod:`~lightning_neuronprune.structure.persistence`),
        so that :func:`~lightning_neuronprune.structure.persistence.load_reduced` can reload it.
        A Hugging Face model whose FFNs all have the same new width gets it in its config
        (:func:`~lightning_neuronprune.structure.surgery.update_config`), so that
        ``save_pretrained`` and ``from_pretrained`` reload it too.

    Raises:
        JunctionError: a target cannot be simplified or ``p`` is out of range. Nothing is changed.
        StatisticsError: no statistics and no data, empty data, or non-finite activations.
    """
    FitOptions(method=method, affine=affine, ridge=ridge)  # validates, naming the argument
    if isinstance(layer, str):
        if p is None:
            raise JunctionError(f"`p` is required when `layer` is a single name ({layer!r})")
        targets: dict[str, Any] = {layer: p}
    elif isinstance(layer, Mapping):
        if p is not None:
            raise JunctionError("give `p` inside the mapping `{layer: p}`, not as an argument")
        if consumer is not None and len(layer) != 1:
            raise JunctionError("`consumer` can only be given with a single target")
        targets = dict(layer)
    else:
        raise JunctionError(f"`layer` must be a name or a mapping {{name: p}}, got {layer!r}")
    if not targets:
        raise JunctionError("no target layer was given")

    resolved = {j.target: j for j in junctions or ()}
    probe = None
    if example is not None and any(t not in resolved for t in targets):
        from lightning_neuronprune.structure.probe import JunctionProbe

        probe = JunctionProbe(model, example)
    junctions = [
        resolved[t] if t in resolved else find_junction(model, t, consumer, probe=probe)
        for t in targets
    ]
    ps = [_validate_p(j, targets[j.target]) for j in junctions]
    given = {
        t: torch.as_tensor(list(v) if not isinstance(v, Tensor) else v, dtype=torch.long)
        for t, v in (kept or {}).items()
    }
    for j, p_j in zip(junctions, ps, strict=True):
        idx = given.get(j.target)
        if idx is not None and (
            idx.numel() != p_j
            or idx.unique().numel() != p_j
            or (p_j and (int(idx.min()) < 0 or int(idx.max()) >= j.num_features))
        ):
            raise JunctionError(
                f"`kept` for {j.target!r} must be {p_j} distinct indices in [0, "
                f"{j.num_features}), got {idx.tolist()}"
            )
    seen: dict[str, str] = {}
    for j in junctions:
        if j.consumer in seen:
            raise JunctionError(
                f"targets {seen[j.consumer]!r} and {j.target!r} name the same junction "
                f"(consumer {j.consumer!r})"
            )
        seen[j.consumer] = j.target
    for j in junctions:
        if _stats_for(stats, j) is None and data is None:
            raise StatisticsError(
                f"no statistics for {j.target!r} (consumer {j.consumer!r}): pass `data` or `stats`"
            )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    plan = sorted(zip(junctions, ps, strict=True), key=lambda jp: order[jp[0].consumer])

    work = copy.deepcopy(model)
    records: list[EliminationRecord] = []
    for k, (junction, p_j) in enumerate(plan):
        st = _stats_for(stats, junction)
        if st is None or (k > 0 and data is not None):
            st = collect_statistics(
                work,
                [junction.consumer],
                data,
                max_samples=max_samples,
                input_fn=input_fn,
                transfer=transfer,
                forward_context=forward_context,
                mask_fn=mask_fn,
                channels=statistics_channels(work, [junction]),
            )[junction.consumer]
        records.append(
            reduce_junction(
                work,
                junction,
                st,
                p_j,
                method=method,
                affine=affine,
                ridge=ridge,
                kept=given.get(junction.target),
            )
        )
        log.info(
            "eliminated %s: kept %d of %d features", junction.layer, p_j, junction.num_features
        )

    previous = read_plan(model)
    if inplace:
        for rec in records:
            for name in rec.modules:
                parent, _, child = name.rpartition(".")
                target_parent = model.get_submodule(parent) if parent else model
                setattr(target_parent, child, work.get_submodule(name))
        result = model
    else:
        result = work
    write_plan(result, previous + [r.as_dict() for r in records])
    update_config(result, read_plan(result))
    return Elimination(result, records)
