"""``NeuronEliminationCallback``: the Lightning shell around the functional core."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_neuronprune.confirmation import (
    Confirmation,
    chunk_batches,
    confirm_front,
    front_within,
    split_batches,
)
from lightning_neuronprune.elimination import eliminate_neurons
from lightning_neuronprune.energy import EnergyModel
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.fitting import FitOptions, JunctionFitter
from lightning_neuronprune.joint import STRATEGIES, JointPoint, JointSearch, apply_joint
from lightning_neuronprune.persistence import install_plan_hook, rebind_optimizer
from lightning_neuronprune.probe import JunctionProbe
from lightning_neuronprune.reporting import (
    PREFIX,
    log_joint_scalars,
    log_scalars,
    mark_confirmations,
    markdown_table,
    tradeoff_figure,
    write_report,
)
from lightning_neuronprune.selection import METHODS
from lightning_neuronprune.statistics import (
    JunctionStatistics,
    _batch_size,
    _truncate,
    batch_input,
    call_model,
    collect_statistics,
)
from lightning_neuronprune.surgery import (
    Junction,
    UndecidedJunctionError,
    auto_junctions,
    find_junction,
    linear_layer_names,
)
from lightning_neuronprune.sweep import (
    CachedEvaluator,
    SweepPoint,
    _to,
    choose,
    model_output,
    pareto_front,
    rank_grid,
    sweep_junction,
)

__all__ = ["NeuronEliminationCallback"]

log = logging.getLogger(__name__)

APPLY_MODES = ("max_energy_saving",)
WEIGHTS = ("last", "best")


class NeuronEliminationCallback(pl.Callback):
    r"""Remove redundant neurons of ``nn.Linear`` layers when training ends, without retraining.

    When ``trainer.fit`` finishes normally, the callback

    1. streams the input statistics of every target's consumer over the training data
       (all-reduced under DDP, so every rank holds the same numbers);
    2. for every target and every p of the rank grid, selects p neurons, re-fits the consumer by
       least squares, and measures the metric on the evaluation data and the modelled energy
       (Algorithm 1 of Zhang, Davoodi & Hu 2018; the sweep of a layer stops once the accuracy
       drop exceeds ``max_accuracy_drop``);
    3. logs everything under ``neuron_elimination/<layer>/...`` with ``step = p``, plus a figure
       of accuracy versus energy and a text table for loggers that take them (TensorBoard), and
       writes ``neuron_elimination.json``/``.csv`` to the trainer's log dir;
    4. applies the configuration picked by ``apply`` to the LightningModule, in place, and writes
       it as a standard Lightning checkpoint next to ``ModelCheckpoint``'s
       (:attr:`reduced_checkpoint_path`, also in the log and the JSON report).

    With ``weights="best"``, the weights of ``ModelCheckpoint``'s best checkpoint are loaded into
    the LightningModule first, and those are reduced.

    Forward passes run the way the Trainer runs them: batches go through the precision plugin's
    ``convert_input`` and the strategy's ``batch_to_device`` (so the LightningModule's batch
    transfer hooks too), and the model runs under the precision plugin's ``forward_context``, so
    every ``Trainer(precision=...)`` works; the statistics are accumulated in float64 and the
    reduced layers keep the model's dtype.

    Checkpoints: in ``setup`` the callback makes the LightningModule's ``load_state_dict`` rebuild
    reduced shapes from a checkpoint's plan first, so ``trainer.fit/validate/test/predict(
    ckpt_path=<reduced checkpoint>)`` work on a fresh instance (optimizer state included).
    ``trainer.test(ckpt_path="best")`` after a reduction refuses with a
    :class:`~lightning_neuronprune.errors.CheckpointMismatchError` that names the reduced
    checkpoint to pass instead: "best" and "last" are ``ModelCheckpoint``'s checkpoints, written
    before the reduction. See :mod:`~lightning_neuronprune.persistence`.

    Work runs in ``on_train_end``, while the model is still on the training device and the
    process group is alive. Every rank performs the same reduction; only rank zero reports.

    Args:
        targets: layer names, or ``"auto"`` for every ``nn.Linear`` whose output neurons have a
            consumer. ``"fc1"`` removes fc1's output neurons; ``"fc1:in"`` removes fc1's input
            features (the paper's "FC1" row of LeNet-300-100). A mapping ``{target: consumer}``
            names the consumers too (checked by the probe). Junctions are found by a probe on
            ``probe_samples`` samples of the first training batch (see
            :mod:`~lightning_neuronprune.probe`), cross-checked by :mod:`torch.fx` where the
            model traces: ``"auto"`` finds the FFN pairs of transformer blocks (BERT's
            ``intermediate.dense`` → ``output.dense``, DistilBERT's ``lin1`` → ``lin2``, ``fc1``
            → ``fc2``) through custom activation modules and untraceable ``forward``\ s.
        ranks: the grid of p per layer: ``"auto"`` (every p up to 64 features, else 48 points plus
            a dense tail), ``"all"`` (every p, Algorithm 1), an int step, a list of ints, or a list
            of fractions of n.
        max_accuracy_drop: the degradation threshold ε, as a fraction (0.02 = 2 points).
        method: ``"svd_qr"`` (the paper's Algorithm 2), ``"qr"`` (nested pivoted Cholesky) or
            ``"output"`` (output-aware greedy: the neurons that best explain the consumer's
            output ``W X``; see :func:`~lightning_neuronprune.selection.output_order`). The
            default is ``"output"``: it keeps fewer neurons than ``"svd_qr"`` at the paper's
            drops in all five MNIST rows and reaches higher joint ratios (docs/RESULTS.md).
        affine: fit an intercept in the least-squares update.
        ridge: relative ridge parameter of the update.
        metric: a ``torchmetrics.Metric`` over ``(predictions, target)``; the default is
            multiclass top-``top_k`` accuracy, with the class count read from the model output.
            Its ``higher_is_better`` sets the direction of ``max_accuracy_drop``: for a loss or
            an MSE (``higher_is_better=False``) an increase is the degradation.
        top_k: k of the default metric.
        energy_model: the energy model (default: 45 nm constants).
        apply: ``"max_energy_saving"`` (the lowest-energy configuration within the threshold,
            across all targets), ``None`` (report only), or ``{layer: p}``.
        max_samples: samples (per process) used for the statistics.
        eval_dataloader: evaluate on this instead of the validation dataloader.
        example_input: one input for the energy model; by default the first evaluation sample.
        joint: with several targets, also search joint configurations of all of them under the
            one budget: ``"greedy"`` (by marginal energy saved per accuracy lost, then re-fitted
            on data), ``"sequential"`` (junction by junction, statistics re-collected on the
            network reduced so far), or ``None`` (single layers only). See
            :mod:`~lightning_neuronprune.joint`.
        joint_order: the layer order of the sequential strategy (default: network order).
        joint_shares: the budget shares of the sequential strategy (default: equal).
        joint_compensate: with ``joint="greedy"``, also re-fit the greedy path with
            compensating fits (each consumer fitted to the original network's output from the
            reduced network's kept features, :mod:`~lightning_neuronprune.compensation`),
            exploring up to 1.5 × the budget and trying the cheapest configurations first.
        confirm_fraction: the share of the evaluation samples held out to confirm the choice
            (``None`` or 0: no confirmation; the budget is then checked only on the data the
            search compared configurations on). The evaluation data is split deterministically,
            by a fixed hash of each sample's position (see
            :mod:`~lightning_neuronprune.confirmation`); the sweeps
            and the joint search use the search part; the lowest-energy configuration within
            the budget there is re-measured on the held-out part and, if it breaks the budget
            there, the next one up the front is tried, until one holds.
        confirm_margin: ask for a confirmed drop of at most ``max_accuracy_drop -
            confirm_margin`` (a fixed safety margin).
        confirm_confidence: a statistical margin instead of (or besides) the fixed one: the
            upper confidence bound of the held-out drop at this level, Bonferroni-corrected for
            the candidates that may be tried, must be within the budget. The standard error
            comes from paired drops over chunks of ``confirm_chunk`` held-out samples. ``None``
            (default): the held-out drop itself is compared.
        confirm_chunk: samples per chunk for ``confirm_confidence``.
        confirm_max_tries: re-measure at most this many candidates.
        verbose: print a line per evaluated configuration (rank zero).
        weights: ``"last"`` reduces the weights that training ended with; ``"best"`` those of the
            Trainer's ``ModelCheckpoint.best_model_path`` (a ``ModelCheckpoint`` is required;
            without ``monitor`` its "best" is its latest checkpoint).
        input_fn: maps a batch to the model input; the default
            (:func:`~lightning_neuronprune.statistics.batch_input`) takes ``x`` of ``(x, y)``, and
            for a Hugging Face-style dict (``input_ids``...) the dict less its ``labels``. The
            model is called as ``model(**input)`` when its ``forward`` takes the dict's keys,
            else ``model(input)`` (a LightningModule whose ``forward`` takes the batch).
        target_fn: maps a batch to the metric's target; the default takes ``y`` of ``(x, y)``
            or the ``labels`` (``y``, ``target``, ``label``...) of a dict.
        output_fn: maps the model output to the metric's predictions; the default takes a
            tensor, or the ``logits`` of a Hugging Face output, or the first element of a tuple.
        mask_fn: maps a batch to its padding mask (B, T), non-zero for real tokens, so that the
            statistics and the least-squares fit count real tokens only; the default takes a
            dict's ``attention_mask`` (``None`` otherwise: every row counts).
        probe_samples: samples of the first training batch used to find the junctions.

    Attributes:
        results: one dict per evaluated point (see :meth:`SweepPoint.as_dict`).
        points: ``{layer: [SweepPoint, ...]}``.
        chosen: the applied :class:`SweepPoint` or :class:`JointPoint`, or ``None``.
        confirmations: the candidates re-measured on the held-out part, in the order tried
            (:class:`~lightning_neuronprune.confirmation.Confirmation`).
        applied: ``{layer: p}`` that was applied.
        report_paths: the JSON and CSV files written (and, with a confirmation,
            ``neuron_elimination_confirmation.csv``).
        reduced_checkpoint_path: the Lightning checkpoint of the reduced model, or ``None`` (no
            reduction, or no ``ModelCheckpoint`` to write it next to).
        source_checkpoint_path: with ``weights="best"``, the checkpoint whose weights were reduced.

    Example::

        trainer = pl.Trainer(max_epochs=5, callbacks=[NeuronEliminationCallback(["fc1", "fc2"])])
        trainer.fit(model, datamodule=dm)   # model is now reduced
        save_reduced(model, "reduced.pt")
    """

    def __init__(
        self,
        targets: str | list[str] | dict[str, str] = "auto",
        ranks: str | int | list[int] | list[float] = "auto",
        max_accuracy_drop: float = 0.02,
        method: str = "output",
        affine: bool = False,
        ridge: float = 0.0,
        metric: Metric | None = None,
        top_k: int = 1,
        energy_model: EnergyModel | None = None,
        apply: str | dict[str, int] | None = "max_energy_saving",
        max_samples: int | None = 60_000,
        eval_dataloader: DataLoader | None = None,
        example_input: Tensor | None = None,
        joint: str | None = "greedy",
        joint_order: list[str] | None = None,
        joint_shares: list[float] | None = None,
        joint_compensate: bool = False,
        confirm_fraction: float | None = 0.5,
        confirm_margin: float = 0.0,
        confirm_confidence: float | None = None,
        confirm_chunk: int = 100,
        confirm_max_tries: int = 20,
        verbose: bool = True,
        weights: str = "last",
        input_fn: Callable[[Any], Any] | None = None,
        target_fn: Callable[[Any], Tensor] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        mask_fn: Callable[[Any], Tensor | None] | None = None,
        probe_samples: int = 8,
    ) -> None:
        super().__init__()
        self._fitters: dict[str, JunctionFitter] = {}
        self.consumers: dict[str, str] = {}
        if isinstance(targets, Mapping):
            bad = {k: v for k, v in targets.items() if not (isinstance(k, str) and k)}
            bad |= {k: v for k, v in targets.items() if not (isinstance(v, str) and v)}
            if bad or not targets:
                raise MisconfigurationException(
                    f"`targets` as a mapping must be a non-empty {{target: consumer}} of layer "
                    f"names, got {targets!r}"
                )
            self.consumers = dict(targets)
            targets = list(targets)
        if targets != "auto":
            if isinstance(targets, str):
                targets = [targets]
            if (
                not isinstance(targets, Sequence)
                or not targets
                or not all(isinstance(t, str) and t for t in targets)
            ):
                raise MisconfigurationException(
                    f"`targets` must be 'auto' or a non-empty list of layer names, got {targets!r}"
                )
            if len(set(targets)) != len(targets):
                raise MisconfigurationException(f"`targets` has duplicates: {targets!r}")
        try:
            rank_grid(10**6, ranks)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        if (
            isinstance(max_accuracy_drop, bool)
            or not isinstance(max_accuracy_drop, (int, float))
            or not 0 <= max_accuracy_drop <= 1
        ):
            raise MisconfigurationException(
                f"`max_accuracy_drop` must be a fraction in [0, 1] (0.02 = 2 points), got "
                f"{max_accuracy_drop!r}"
            )
        if method not in METHODS:
            raise MisconfigurationException(
                f"`method` must be one of {list(METHODS)}, got {method!r}"
            )
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0:
            raise MisconfigurationException(f"`ridge` must be a non-negative number, got {ridge!r}")
        if metric is not None and not isinstance(metric, Metric):
            raise MisconfigurationException(
                f"`metric` must be a torchmetrics.Metric, got {type(metric).__name__}"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise MisconfigurationException(f"`top_k` must be a positive integer, got {top_k!r}")
        if energy_model is not None and not isinstance(energy_model, EnergyModel):
            raise MisconfigurationException(
                f"`energy_model` must be an EnergyModel, got {type(energy_model).__name__}"
            )
        if isinstance(apply, dict):
            bad = {
                k: v
                for k, v in apply.items()
                if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1
            }
            if bad or not apply:
                raise MisconfigurationException(
                    "`apply` as a mapping must be a non-empty {layer: p} with p ≥ 1, got "
                    f"{apply!r}"
                )
        elif apply is not None and apply not in APPLY_MODES:
            raise MisconfigurationException(
                f"`apply` must be one of {list(APPLY_MODES)}, None or {{layer: p}}, got {apply!r}"
            )
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise MisconfigurationException(
                f"`max_samples` must be a positive integer or None, got {max_samples!r}"
            )
        self.targets = targets
        self.ranks = ranks
        self.max_accuracy_drop = float(max_accuracy_drop)
        self.method = method
        self.affine = affine
        self.ridge = float(ridge)
        self.metric = metric
        self.top_k = top_k
        self.energy_model = energy_model or EnergyModel()
        self.apply = apply
        self.max_samples = max_samples
        self.eval_dataloader = eval_dataloader
        self.example_input = example_input
        if joint is not None and joint not in STRATEGIES:
            raise MisconfigurationException(
                f"`joint` must be one of {list(STRATEGIES)} or None, got {joint!r}"
            )
        if joint_shares is not None and (
            not joint_shares or any(not isinstance(w, (int, float)) or w < 0 for w in joint_shares)
        ):
            raise MisconfigurationException(
                f"`joint_shares` must be non-negative numbers, got {joint_shares!r}"
            )
        if confirm_fraction is not None and (
            isinstance(confirm_fraction, bool)
            or not isinstance(confirm_fraction, (int, float))
            or not 0 <= confirm_fraction < 1
        ):
            raise MisconfigurationException(
                f"`confirm_fraction` must be None or a fraction in [0, 1), got {confirm_fraction!r}"
            )
        if (
            isinstance(confirm_margin, bool)
            or not isinstance(confirm_margin, (int, float))
            or not 0 <= confirm_margin <= max_accuracy_drop
        ):
            raise MisconfigurationException(
                f"`confirm_margin` must be a number in [0, max_accuracy_drop="
                f"{max_accuracy_drop}], got {confirm_margin!r}"
            )
        self.joint = joint
        self.joint_order = joint_order
        self.joint_shares = joint_shares
        if not isinstance(joint_compensate, bool):
            raise MisconfigurationException(
                f"`joint_compensate` must be a bool, got {joint_compensate!r}"
            )
        self.joint_compensate = joint_compensate
        self.confirm_fraction = float(confirm_fraction) if confirm_fraction else None
        self.confirm_margin = float(confirm_margin)
        if confirm_confidence is not None and (
            isinstance(confirm_confidence, bool)
            or not isinstance(confirm_confidence, (int, float))
            or not 0 < confirm_confidence < 1
        ):
            raise MisconfigurationException(
                f"`confirm_confidence` must be None or a level in (0, 1), got "
                f"{confirm_confidence!r}"
            )
        for name, value in (
            ("confirm_chunk", confirm_chunk),
            ("confirm_max_tries", confirm_max_tries),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(
                    f"`{name}` must be a positive integer, got {value!r}"
                )
        self.confirm_confidence = confirm_confidence
        self.confirm_chunk = confirm_chunk
        self.confirm_max_tries = confirm_max_tries
        self.verbose = verbose
        if weights not in WEIGHTS:
            raise MisconfigurationException(
                f"`weights` must be one of {list(WEIGHTS)}, got {weights!r}"
            )
        self.weights = weights
        for name, fn in (
            ("input_fn", input_fn), ("target_fn", target_fn), ("output_fn", output_fn),
            ("mask_fn", mask_fn),
        ):  # fmt: skip
            if fn is not None and not callable(fn):
                raise MisconfigurationException(f"`{name}` must be callable, got {fn!r}")
        if (
            isinstance(probe_samples, bool)
            or not isinstance(probe_samples, int)
            or probe_samples < 1
        ):
            raise MisconfigurationException(
                f"`probe_samples` must be a positive integer, got {probe_samples!r}"
            )
        self.input_fn = input_fn
        self.target_fn = target_fn
        self.output_fn = output_fn
        self.mask_fn = mask_fn
        self.probe_samples = probe_samples

        self.results: list[dict[str, Any]] = []
        self.points: dict[str, list[SweepPoint]] = {}
        self.joint_points: list[JointPoint] = []
        self.chosen: SweepPoint | JointPoint | None = None
        self.confirmations: list[Confirmation[Any]] = []
        self.applied: dict[str, int] = {}
        self.report_paths: tuple[Any, ...] = ()
        self.reduced_checkpoint_path: str | None = None
        self.source_checkpoint_path: str | None = None
        self._forward: dict[str, Any] = {}
        self._failed = False

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the Trainer restores `ckpt_path`: reduced checkpoints rebuild their shapes.
        install_plan_hook(pl_module)
        if stage == "fit" and self.weights == "best":
            self._best_checkpoint(trainer, check_path=False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._failed = False
        # Refuse bad targets and missing evaluation data before any training; what tracing
        # cannot decide waits for the probe on a real batch in `_run`.
        self._check_targets(pl_module)
        if self.eval_dataloader is None and not _has_val_source(trainer):
            raise MisconfigurationException(
                "NeuronEliminationCallback needs evaluation data: give the LightningModule or "
                "datamodule a `val_dataloader`, or pass `eval_dataloader=`"
            )

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._failed = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._failed or trainer.interrupted:
            rank_zero_warn("NeuronEliminationCallback: fit did not finish normally; no reduction")
            return
        if trainer.fast_dev_run:
            rank_zero_info("NeuronEliminationCallback: skipped under fast_dev_run")
            return
        self._run(trainer, pl_module)

    # --------------------------------------------------------------- helpers

    def _check_targets(self, pl_module: pl.LightningModule) -> None:
        """Early refusals by tracing only; undecided targets are left to the probe."""
        if self.targets == "auto":
            return
        try:
            with warnings.catch_warnings():  # an untraced explicit consumer: the probe checks it
                warnings.simplefilter("ignore", UserWarning)
                self._resolve_junctions(pl_module)
        except UndecidedJunctionError as err:
            log.debug("targets left to the probe: %s", err)

    def _first_input(self, loader: Iterable[Any], device: torch.device, size: int) -> Any:
        """The model input of the loader's first batch, as the Trainer feeds it, cut to
        ``size`` samples."""
        batch = next(iter(loader))
        transfer = self._forward.get("transfer")
        x = (self.input_fn or batch_input)(transfer(batch) if transfer is not None else batch)
        if _batch_size(x) > size:
            x = _truncate(x, size)
        return _to(x, device)

    def _probe(self, pl_module: pl.LightningModule, example: Any) -> JunctionProbe:
        context = self._forward.get("forward_context") or contextlib.nullcontext

        def call(model: torch.nn.Module, x: Any) -> Any:
            with context():
                return call_model(model, x)

        return JunctionProbe(pl_module, example, call=call)

    def _resolve_junctions(
        self, pl_module: pl.LightningModule, example: Any = None
    ) -> list[Junction]:
        probe = self._probe(pl_module, example) if example is not None else None
        if self.targets == "auto":
            junctions = auto_junctions(pl_module, probe=probe)
            if not junctions:
                raise JunctionError(
                    f"`targets='auto'` found no nn.Linear with a consumer in "
                    f"{type(pl_module).__name__}; Linear layers: {linear_layer_names(pl_module)}"
                )
            return junctions
        junctions = [
            find_junction(pl_module, t, self.consumers.get(t), probe=probe) for t in self.targets
        ]
        consumers: dict[str, str] = {}
        for j in junctions:
            if j.consumer in consumers:
                raise JunctionError(
                    f"targets {consumers[j.consumer]!r} and {j.target!r} name the same junction"
                )
            consumers[j.consumer] = j.target
        if isinstance(self.apply, dict):
            by_name = {j.target: j for j in junctions} | {j.layer: j for j in junctions}
            unknown = [k for k in self.apply if k not in by_name]
            if unknown:
                raise MisconfigurationException(
                    f"`apply` names {unknown}, which are not among the targets {sorted(by_name)}"
                )
            for k, p in self.apply.items():
                if p > by_name[k].num_features:
                    raise MisconfigurationException(
                        f"`apply` asks for p={p} in {k!r}, which has only "
                        f"{by_name[k].num_features} features"
                    )
        return junctions

    def _eval_loader(self, trainer: pl.Trainer) -> Iterable[Any]:
        loader = self.eval_dataloader
        if loader is None:
            if trainer.val_dataloaders is None:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loader = trainer.val_dataloaders
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            if isinstance(loader, dict):
                loader = next(iter(loader.values()), None)
        if loader is None:
            raise MisconfigurationException(
                "NeuronEliminationCallback needs evaluation data: give the LightningModule or "
                "datamodule a `val_dataloader`, or pass `eval_dataloader=`"
            )
        _check_nonempty(loader, "evaluation")
        return loader

    def _train_loader(self, trainer: pl.Trainer) -> Iterable[Any]:
        loader = trainer.train_dataloader
        if loader is None:
            raise MisconfigurationException(
                "NeuronEliminationCallback found no training dataloader"
            )
        _check_nonempty(loader, "training")
        return loader

    def _split_eval(self, loader: Iterable[Any]) -> tuple[Iterable[Any], list[Any] | None]:
        """The search part and the held-out confirmation part of the evaluation data."""
        self.confirmations = []
        if self.confirm_fraction is None:
            return loader, None
        search, held_out = split_batches(loader, self.confirm_fraction)
        self._info(
            f"neuron elimination: {1 - self.confirm_fraction:.0%} of the evaluation samples for "
            f"the search, {self.confirm_fraction:.0%} held out to confirm the choice"
        )
        return search, held_out

    def _confirm(
        self, pl_module: pl.LightningModule, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], every: list[SweepPoint], held_out: list[Any],
        metric: Metric, device: torch.device,
    ) -> tuple[SweepPoint | JointPoint | None, dict[str, int]]:  # fmt: skip
        """Re-measure the candidates on the held-out part, from the lowest energy up, and keep
        the first whose drop there stays within the budget (minus ``confirm_margin``)."""
        candidates: list[SweepPoint | JointPoint] = [pt for pt in every if pt.p < pt.n]
        candidates += [pt for pt in self.joint_points if pt.strategy != "baseline"]
        front = front_within(candidates, self.max_accuracy_drop)
        first = junctions[0].consumer
        chunks = chunk_batches(held_out, self.confirm_chunk) if self.confirm_confidence else []

        def evaluate(module: torch.nn.Module) -> Any:
            fns = self._eval_fns()
            value = CachedEvaluator(
                module, first, held_out, metric, device=device, cache=False, **fns
            )()
            if not self.confirm_confidence:
                return value
            per_chunk = [
                CachedEvaluator(module, first, c, metric, device=device, cache=False, **fns)()
                for c in chunks
            ]
            return value, per_chunk

        def measure(pt: SweepPoint | JointPoint) -> Any:
            reduced = copy.deepcopy(pl_module)
            self._reduce(reduced, junctions, stats, pt)
            return evaluate(reduced)

        chosen, self.confirmations = confirm_front(
            front, measure, evaluate(pl_module), self.max_accuracy_drop,
            higher_is_better=getattr(metric, "higher_is_better", True),
            margin=self.confirm_margin, confidence=self.confirm_confidence,
            max_tries=self.confirm_max_tries,
        )  # fmt: skip
        for c in self.confirmations:
            bound = "" if c.upper_bound is None else f" (upper bound {c.upper_bound:+.4f})"
            self._info(
                f"neuron elimination [confirm] {_label(c.point)}: drop {c.search_drop:+.4f} on the "
                f"search part, {c.confirmed_drop:+.4f} held out{bound} -> "
                + ("kept" if c.held else "rejected")
            )
        if chosen is None:
            rank_zero_warn(
                f"NeuronEliminationCallback: no configuration within the budget "
                f"{self.max_accuracy_drop} on the search part kept it on the held-out part "
                f"({len(self.confirmations)} tried); the model is left unchanged"
            )
            return None, {}
        if isinstance(chosen, JointPoint):
            sizes = {j.layer: j.num_features for j in junctions}
            return chosen, {k: v for k, v in chosen.config.items() if v < sizes[k]}
        return chosen, {chosen.layer: chosen.p}

    def _reduce(
        self, module: torch.nn.Module, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], pt: SweepPoint | JointPoint,
    ) -> None:  # fmt: skip
        """Apply one evaluated configuration to ``module`` in place, exactly as evaluated."""
        if isinstance(pt, JointPoint):
            apply_joint(
                module, junctions, pt, method=self.method, affine=self.affine, ridge=self.ridge
            )
            return
        j = next(j for j in junctions if j.layer == pt.layer)
        eliminate_neurons(
            module, {j.target: pt.p}, stats={j.consumer: stats[j.consumer]},
            kept={j.target: pt.kept}, method=self.method, affine=self.affine, ridge=self.ridge,
            inplace=True,
        )  # fmt: skip

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(message)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        eval_loader = self._eval_loader(trainer)
        train_loader = self._train_loader(trainer)
        device = trainer.strategy.root_device
        pl_module.to(device)
        self._forward = _trainer_forward(trainer)
        self.reduced_checkpoint_path = self.source_checkpoint_path = None
        if self.weights == "best":
            self._load_best(trainer, pl_module)
        junctions = self._resolve_junctions(
            pl_module, self._first_input(train_loader, device, self.probe_samples)
        )

        stats = self._collect(pl_module, junctions, train_loader, device)
        example = self._example(eval_loader, device)
        metric = self._metric(pl_module, example, device)
        self._fitters.clear()
        search_loader, held_out = self._split_eval(eval_loader)
        try:
            self.points = self._sweep(
                pl_module, junctions, stats, search_loader, metric, example, device
            )
            every = [pt for pts in self.points.values() for pt in pts]
            self.results = [pt.as_dict() for pt in every]
            self.joint_points = self._joint(
                pl_module, junctions, stats, search_loader, train_loader, metric, example
            )
        finally:
            self._fitters.clear()  # they hold n × n matrices per junction
        self.chosen, plan = self._choose(every, junctions)
        if held_out is not None and self.apply == "max_energy_saving":
            self.chosen, plan = self._confirm(
                pl_module, junctions, stats, every, held_out, metric, device
            )
        self._report(trainer, every)
        before = dict(pl_module.named_parameters())
        self._apply(pl_module, junctions, stats, plan)
        if plan:
            self._save_reduced(trainer, pl_module, before)
        self._info(
            f"neuron elimination finished in {time.perf_counter() - started:.1f}s: "
            + (f"applied {self.applied}" if self.applied else "model unchanged")
        )

    def _collect(
        self, pl_module: pl.LightningModule, junctions: list[Junction], loader: Iterable[Any],
        device: torch.device,
    ) -> dict[str, JunctionStatistics]:  # fmt: skip
        self._info(
            f"neuron elimination: collecting statistics of {[j.layer for j in junctions]} "
            f"(max {self.max_samples} samples per process)"
        )
        return collect_statistics(
            pl_module, [j.consumer for j in junctions], loader,
            max_samples=self.max_samples, device=device, **self._forward_kwargs(),
            input_fn=self.input_fn, mask_fn=self.mask_fn,
        )  # fmt: skip

    def _example(self, loader: Iterable[Any], device: torch.device) -> Any:
        if self.example_input is not None:
            convert = self._forward.get("convert", lambda x: x)
            return convert(_to(self.example_input, device))
        return self._first_input(loader, device, 1)

    def _metric(self, pl_module: pl.LightningModule, example: Any, device: torch.device) -> Metric:
        if self.metric is not None:
            return self.metric.to(device)
        was_training = pl_module.training
        pl_module.eval()
        context = self._forward.get("forward_context") or contextlib.nullcontext
        try:
            with torch.no_grad(), context():
                out = call_model(pl_module, example)
        finally:
            pl_module.train(was_training)
        logits = (self.output_fn or model_output)(out)
        num_classes = int(logits.shape[-1])
        if num_classes < 2:
            raise MisconfigurationException(
                f"the default metric needs class scores, but the model outputs shape "
                f"{tuple(logits.shape)}; pass `metric=`"
            )
        return MulticlassAccuracy(
            num_classes, top_k=min(self.top_k, num_classes), average="micro"
        ).to(device)

    def _sweep(
        self, pl_module: pl.LightningModule, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], loader: Iterable[Any], metric: Metric,
        example: Any, device: torch.device,
    ) -> dict[str, list[SweepPoint]]:  # fmt: skip
        points: dict[str, list[SweepPoint]] = {}
        baseline = None
        for i, j in enumerate(junctions, 1):
            evaluator = CachedEvaluator(
                pl_module,
                j.consumer,
                loader,
                metric,
                device=device,
                **self._forward_kwargs(),
                **self._eval_fns(),
            )
            if baseline is None:
                baseline = (evaluator(), self.energy_model.estimate(pl_module, example))
                self._info(
                    f"neuron elimination: baseline accuracy {baseline[0]:.4f}, energy "
                    f"{baseline[1].total * 1e6:.3f} µJ"
                )

            def progress(pt: SweepPoint, i: int = i) -> None:
                self._info(
                    f"neuron elimination [{i}/{len(junctions)}] {pt.layer}: p={pt.p}/{pt.n} "
                    f"accuracy {pt.accuracy:.4f} (drop {pt.accuracy_drop:+.4f}), energy "
                    f"{pt.energy_ratio:.2f}× lower"
                )

            consumer = pl_module.get_submodule(j.consumer)
            options = FitOptions(method=self.method, affine=self.affine, ridge=self.ridge)
            fitter = JunctionFitter(stats[j.consumer], consumer.weight, consumer.bias, options)
            self._fitters[j.layer] = fitter  # the joint search reuses the selection work
            points[j.layer] = sweep_junction(
                pl_module, j, stats[j.consumer], evaluator, self.energy_model, example,
                ranks=self.ranks, options=options, fitter=fitter,
                max_accuracy_drop=self.max_accuracy_drop, baseline=baseline, on_point=progress,
            )  # fmt: skip
        return points

    def _joint(
        self, pl_module: pl.LightningModule, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], eval_loader: Iterable[Any],
        train_loader: Iterable[Any], metric: Metric, example: Any,
    ) -> list[JointPoint]:  # fmt: skip
        if self.joint is None or len(junctions) < 2:
            return []
        first = self.points[junctions[0].layer][0]  # the unreduced baseline
        self._info(
            f"neuron elimination: joint search ({self.joint}) over {[j.layer for j in junctions]}"
        )

        def progress(pt: JointPoint) -> None:
            self._info(
                f"neuron elimination [joint {self.joint}] {pt.label}: accuracy {pt.accuracy:.4f} "
                f"(drop {pt.accuracy_drop:+.4f}), energy {pt.energy_ratio:.2f}× lower"
            )

        search = JointSearch(
            pl_module, junctions, stats, eval_loader, metric, self.energy_model, example,
            train_data=train_loader, method=self.method, affine=self.affine, ridge=self.ridge,
            ranks=self.ranks, max_samples=self.max_samples, on_point=progress,
            baseline=(first.accuracy, first.energy), fitters=self._fitters,
            **self._forward_kwargs(), data_fns=self._data_fns(),
        )  # fmt: skip
        if self.joint == "greedy":
            return search.greedy(
                self.max_accuracy_drop, compensate=self.joint_compensate,
                slack=self.max_accuracy_drop / 2,
            )  # fmt: skip
        return search.sequential(
            self.max_accuracy_drop, order=self.joint_order, shares=self.joint_shares
        )

    def _eval_fns(self) -> dict[str, Any]:
        return {"input_fn": self.input_fn, "target_fn": self.target_fn, "output_fn": self.output_fn}

    def _data_fns(self) -> dict[str, Any]:
        return {**self._eval_fns(), "mask_fn": self.mask_fn}

    def _choose(
        self, every: list[SweepPoint], junctions: list[Junction]
    ) -> tuple[SweepPoint | JointPoint | None, dict[str, int]]:
        if self.apply is None:
            return None, {}
        if isinstance(self.apply, dict):
            by_target = {j.target: j.layer for j in junctions}
            plan = {by_target.get(k, k): v for k, v in self.apply.items()}
            matching = [pt for pt in every if plan.get(pt.layer) == pt.p]
            return (matching[0] if len(plan) == 1 and matching else None), plan
        reduced: list[SweepPoint | JointPoint] = [pt for pt in every if pt.p < pt.n]
        reduced += self.joint_points
        best = choose(reduced, self.max_accuracy_drop)
        if best is None:
            rank_zero_warn(
                f"NeuronEliminationCallback: no configuration keeps the accuracy drop within "
                f"{self.max_accuracy_drop}; the model is left unchanged"
            )
            return None, {}
        if isinstance(best, JointPoint):
            sizes = {j.layer: j.num_features for j in junctions}
            return best, {k: v for k, v in best.config.items() if v < sizes[k]}
        return best, {best.layer: best.p}

    def _report(self, trainer: pl.Trainer, every: list[SweepPoint]) -> None:
        if trainer.loggers:
            log_scalars(trainer.loggers, every)
            if self.joint_points:
                log_joint_scalars(trainer.loggers, self.joint_points)
            self._log_confirmations(trainer)
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it.
        directory = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        table = markdown_table(every, self.chosen)
        if self.joint_points:
            front = pareto_front(self.joint_points + every)
            table += "\n**Pareto front, joint and single-layer:**\n\n" + markdown_table(
                front, self.chosen
            )
        if self.confirmations:
            table += "\n" + self._confirmation_table()
        figure = None
        try:
            figure = tradeoff_figure(self.points, self.chosen, joint=self.joint_points)
            if self.confirmations:
                search_base = next(iter(self.points.values()))[0].accuracy
                mark_confirmations(figure, self.confirmations, search_base)
        except ImportError:
            rank_zero_warn("matplotlib is not installed: the trade-off figure is not logged")
        for lg in trainer.loggers:
            experiment = getattr(lg, "experiment", None)
            if figure is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure(f"{PREFIX}/tradeoff", figure, global_step=0, close=False)
            if hasattr(experiment, "add_text"):
                experiment.add_text(f"{PREFIX}/configurations", table, global_step=0)
        self.report_paths = write_report(
            directory, every, self.chosen,
            extra={
                "applied": self._pending_plan(),
                "joint": [pt.as_dict() for pt in self.joint_points],
                "weights": self.weights,
                "source_checkpoint": self.source_checkpoint_path,
                "reduced_checkpoint": None,
                "joint_front": [
                    pt.as_dict()
                    for pt in pareto_front(self.joint_points)
                    if isinstance(pt, JointPoint)
                ],
                "confirm_fraction": self.confirm_fraction,
                "confirmation": [c.as_dict() for c in self.confirmations],
            },
        )  # fmt: skip
        if self.confirmations:
            self.report_paths = (*self.report_paths, self._write_confirmation_csv(directory))
        self._info(f"neuron elimination: report written to {self.report_paths[0]}")

    def _log_confirmations(self, trainer: pl.Trainer) -> None:
        """Search and held-out drops side by side, ``step`` = the order they were tried in."""
        for i, c in enumerate(self.confirmations):
            values = {
                f"{PREFIX}/confirmation/search_drop": c.search_drop,
                f"{PREFIX}/confirmation/confirmed_drop": c.confirmed_drop,
                f"{PREFIX}/confirmation/held": float(c.held),
                **(
                    {f"{PREFIX}/confirmation/upper_bound": c.upper_bound}
                    if c.upper_bound is not None
                    else {}
                ),
                f"{PREFIX}/confirmation/energy_ratio": c.point.energy_ratio,
            }
            for lg in trainer.loggers:
                lg.log_metrics(values, step=i)

    def _write_confirmation_csv(self, directory: Any) -> Path:
        """``neuron_elimination_confirmation.csv``: one row per re-measured candidate."""
        path = Path(directory) / "neuron_elimination_confirmation.csv"
        rows = [c.as_dict() for c in self.confirmations]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def _confirmation_table(self) -> str:
        lines = [
            f"**Held-out confirmation** ({self.confirm_fraction:.0%} of the evaluation samples; "
            f"budget {self.max_accuracy_drop:.4f}, margin {self.confirm_margin:.4f}, confidence "
            f"{self.confirm_confidence}):",
            "",
            "| configuration | search drop | held-out drop | upper bound | energy ratio | result |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.confirmations:
            bound = "—" if c.upper_bound is None else f"{c.upper_bound:.4f}"
            lines.append(
                f"| {_label(c.point)} | {c.search_drop:.4f} | {c.confirmed_drop:.4f} | {bound} | "
                f"{c.point.energy_ratio:.2f}× | {'confirmed' if c.held else 'rejected'} |"
            )
        return "\n".join(lines) + "\n"

    def _pending_plan(self) -> dict[str, int]:
        if isinstance(self.chosen, JointPoint):
            return dict(self.chosen.config)
        if self.chosen is not None:
            return {self.chosen.layer: self.chosen.p}
        return dict(self.apply) if isinstance(self.apply, dict) else {}

    def _apply(
        self, pl_module: pl.LightningModule, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], plan: dict[str, int],
    ) -> None:  # fmt: skip
        if not plan:
            return
        if isinstance(self.chosen, JointPoint):
            apply_joint(
                pl_module, junctions, self.chosen, method=self.method, affine=self.affine,
                ridge=self.ridge,
            )  # fmt: skip
            self.applied = dict(plan)
            self._info(f"neuron elimination: applied the joint configuration {plan}")
            return
        by_layer = {j.layer: j for j in junctions}
        kept = {}
        for layer, p in plan.items():
            swept = next((pt for pt in self.points.get(layer, []) if pt.p == p), None)
            if swept is not None:
                kept[by_layer[layer].target] = swept.kept
        eliminate_neurons(
            pl_module, {by_layer[layer].target: p for layer, p in plan.items()},
            stats={by_layer[layer].consumer: stats[by_layer[layer].consumer] for layer in plan},
            method=self.method, affine=self.affine, ridge=self.ridge, inplace=True, kept=kept,
            junctions=junctions,
        )  # fmt: skip
        self.applied = dict(plan)
        self._info(f"neuron elimination: applied {plan}")

    # ------------------------------------------------------- precision and checkpoints

    def _forward_kwargs(self) -> dict[str, Any]:
        """``transfer`` and ``forward_context`` for the functional core (empty outside a run)."""
        return {k: v for k, v in self._forward.items() if k in ("transfer", "forward_context")}

    def _best_checkpoint(self, trainer: pl.Trainer, *, check_path: bool = True) -> str:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or not hasattr(checkpoint, "best_model_path"):
            raise MisconfigurationException(
                "NeuronEliminationCallback(weights='best') reduces the best checkpoint's weights, "
                "but the Trainer has no ModelCheckpoint: add "
                "`ModelCheckpoint(monitor=...)` to its callbacks, or use `weights='last'`"
            )
        path = checkpoint.best_model_path
        if check_path and not path:
            raise MisconfigurationException(
                "NeuronEliminationCallback(weights='best'): ModelCheckpoint has no best checkpoint "
                f"(`best_model_path` is empty; monitor={checkpoint.monitor!r}), so there are no "
                "best weights to reduce: check that the monitored metric is logged, or use "
                "`weights='last'`"
            )
        return path

    def _load_best(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load ModelCheckpoint's best weights into ``pl_module`` (every rank), in place."""
        # Under DDP every rank reduces rank zero's best (ranks may rank their own metrics apart).
        path = trainer.strategy.broadcast(self._best_checkpoint(trainer))
        checkpoint = trainer.strategy.load_checkpoint(path)
        trainer.strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
        self.source_checkpoint_path = str(path)
        self._info(f"neuron elimination: reducing the best checkpoint's weights, {path}")

    def _reduced_path(self, trainer: pl.Trainer) -> str | None:
        """``<ModelCheckpoint.dirpath>/<best stem>-reduced.ckpt`` or ``reduced-step=<k>.ckpt``."""
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if not dirpath:
            return None
        if self.source_checkpoint_path:
            stem = os.path.splitext(os.path.basename(self.source_checkpoint_path))[0] + "-reduced"
        else:
            stem = f"reduced-step={trainer.global_step}"
        path, version = os.path.join(dirpath, stem + ".ckpt"), 0
        while os.path.exists(path):
            version += 1
            path = os.path.join(dirpath, f"{stem}-v{version}.ckpt")
        return trainer.strategy.broadcast(path)

    def _save_reduced(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, before: dict[str, Any]
    ) -> None:
        """Make the trainer's state consistent with the reduced model and checkpoint it.

        The optimizers are re-pointed at the new parameters (the reduced layers' optimizer state
        starts afresh), so that the checkpoint resumes; it is written with
        ``trainer.save_checkpoint`` (every rank calls it, rank zero writes).
        """
        for optimizer in trainer.optimizers:
            rebind_optimizer(optimizer, before, pl_module)
        path = self._reduced_path(trainer)
        if path is None:
            install_plan_hook(
                pl_module,
                advice=(
                    "The reduced model lives in memory only (the Trainer has no ModelCheckpoint "
                    "to write its checkpoint next to): pass it without `ckpt_path`, or save it "
                    "first (`trainer.save_checkpoint(path)`, `save_reduced(model, path)`). Load "
                    "unreduced weights into a fresh, unreduced instance."
                ),
            )
            return
        trainer.save_checkpoint(path)
        self.reduced_checkpoint_path = path
        install_plan_hook(
            pl_module,
            advice=(
                f"NeuronEliminationCallback saved the reduced model as {path!r} "
                f"(`callback.reduced_checkpoint_path`): pass `ckpt_path={path!r}`, or pass the "
                "model without `ckpt_path` to use it as it is in memory. ModelCheckpoint's "
                "'best' and 'last' checkpoints were written before the reduction and hold the "
                "unreduced weights."
            ),
        )
        rank_zero_info(f"neuron elimination: reduced model saved as the checkpoint {path}")
        if trainer.is_global_zero and self.report_paths:
            report = self.report_paths[0]
            doc = json.loads(report.read_text())
            doc["reduced_checkpoint"] = path
            report.write_text(json.dumps(doc, indent=2))


def _trainer_forward(trainer: pl.Trainer) -> dict[str, Any]:
    """How the Trainer feeds its model: ``transfer`` (a raw batch through the precision plugin's
    ``convert_input`` then the strategy's ``batch_to_device``, as the fit loop does),
    ``convert`` (an input's dtype only) and ``forward_context`` (the precision plugin's)."""
    strategy, precision = trainer.strategy, trainer.precision_plugin

    def transfer(batch: Any) -> Any:
        return strategy.batch_to_device(precision.convert_input(batch))

    return {
        "transfer": transfer,
        "convert": precision.convert_input,
        "forward_context": precision.forward_context,
    }


def _label(pt: SweepPoint | JointPoint) -> str:
    return pt.label if isinstance(pt, JointPoint) else f"{pt.layer}={pt.p}"


def _has_val_source(trainer: pl.Trainer) -> bool:
    """Whether the fit has a validation dataloader (from the module or the datamodule)."""
    try:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        return bool(source.is_defined()) and trainer.limit_val_batches != 0
    except AttributeError:  # pragma: no cover - private API moved; check again in on_train_end
        return True


def _check_nonempty(loader: Any, what: str) -> None:
    try:
        size = len(loader)
    except TypeError:
        return
    if size == 0:
        raise MisconfigurationException(f"the {what} dataloader is empty")
