"""``NeuronEliminationCallback``: the Lightning shell around the functional core."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable
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

from lightning_neuronprune._lightning import (
    NO_EVAL_DATA,
    best_checkpoint,
    has_val_source,
    load_best,
    reduced_checkpoint_path,
    trainer_forward,
)
from lightning_neuronprune._lightning import eval_loader as get_eval_loader
from lightning_neuronprune._lightning import train_loader as get_train_loader
from lightning_neuronprune._runtime import evaluating, to_device
from lightning_neuronprune.confirmation import (
    Confirmation,
    chunk_batches,
    confirm_front,
    front_within,
    split_batches,
)
from lightning_neuronprune.decision import (
    Decision,
    apply_decision,
    decide,
    decision_for,
)
from lightning_neuronprune.elimination import eliminate_neurons
from lightning_neuronprune.energy import EnergyModel
from lightning_neuronprune.errors import UndecidedJunctionError
from lightning_neuronprune.evaluation import CachedEvaluator, metric_direction, model_output
from lightning_neuronprune.fitting import FitOptions, JunctionFitter
from lightning_neuronprune.joint import JointPoint, JointSearch
from lightning_neuronprune.junctions import Junction
from lightning_neuronprune.pareto import pareto_front
from lightning_neuronprune.persistence import install_plan_hook, rebind_optimizer
from lightning_neuronprune.progress import ProgressBar, sample_count
from lightning_neuronprune.reporting import (
    confirmation_table,
    log_confirmations,
    log_joint_scalars,
    log_scalars,
    log_summary,
    point_label,
    write_confirmation_csv,
    write_report,
)
from lightning_neuronprune.statistics import (
    JunctionStatistics,
    call_model,
    collect_statistics,
    first_input,
)
from lightning_neuronprune.sweep import SweepPoint, rank_grid, sweep_junction
from lightning_neuronprune.targets import Targets, resolve_targets
from lightning_neuronprune.validation import (
    check_against_targets,
    check_arguments,
    check_choice,
    check_confirmation,
)

__all__ = ["NeuronEliminationCallback"]

log = logging.getLogger(__name__)

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
        result: the :class:`~lightning_neuronprune.decision.Decision`, made once; the report
            and the reduced model both follow it.
        confirmations: the candidates re-measured on the held-out part, in the order tried
            (:class:`~lightning_neuronprune.confirmation.Confirmation`).
        applied: ``{layer: p}`` that was applied (changed layers only, canonical names).
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
        adapters = {
            "input_fn": input_fn, "target_fn": target_fn, "output_fn": output_fn,
            "mask_fn": mask_fn,
        }  # fmt: skip
        try:
            targets = check_arguments(
                targets=targets, ranks=ranks, max_accuracy_drop=max_accuracy_drop,
                options={"method": method, "affine": affine, "ridge": ridge}, top_k=top_k,
                energy_model=energy_model, apply=apply, max_samples=max_samples, joint=joint,
                joint_order=joint_order, joint_shares=joint_shares, verbose=verbose,
                adapters=adapters, probe_samples=probe_samples,
            )  # fmt: skip
            check_confirmation(
                confirm_fraction=confirm_fraction, confirm_margin=confirm_margin,
                confirm_confidence=confirm_confidence, confirm_chunk=confirm_chunk,
                confirm_max_tries=confirm_max_tries, max_accuracy_drop=max_accuracy_drop,
            )  # fmt: skip
            check_choice("joint_compensate", joint_compensate, (True, False))
            check_choice("weights", weights, WEIGHTS)
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(str(err)) from err
        if metric is not None and not isinstance(metric, Metric):
            raise MisconfigurationException(
                f"`metric` must be a torchmetrics.Metric, got {type(metric).__name__}"
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
        self.joint = joint
        self.joint_order = joint_order
        self.joint_shares = joint_shares
        self.joint_compensate = joint_compensate
        self.confirm_fraction = float(confirm_fraction) if confirm_fraction else None
        self.confirm_margin = float(confirm_margin)
        self.confirm_confidence = confirm_confidence
        self.confirm_chunk = confirm_chunk
        self.confirm_max_tries = confirm_max_tries
        self.verbose = verbose
        self.weights = weights
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
        self.result = Decision()
        self.applied: dict[str, int] = {}
        self.report_paths: tuple[Any, ...] = ()
        self.reduced_checkpoint_path: str | None = None
        self.source_checkpoint_path: str | None = None
        self._forward: dict[str, Any] = {}
        self._failed = False
        self._search: JointSearch | None = None
        self._joint_layers: list[str] | None = None

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the Trainer restores `ckpt_path`: reduced checkpoints rebuild their shapes.
        install_plan_hook(pl_module)
        if stage == "fit" and self.weights == "best":
            best_checkpoint(trainer, check_path=False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._failed = False
        # Refuse bad targets and missing evaluation data before any training; what tracing
        # cannot decide waits for the probe on a real batch in `_run`.
        self._resolve_junctions(pl_module)
        if self.eval_dataloader is None and not has_val_source(trainer):
            raise MisconfigurationException(NO_EVAL_DATA)

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

    def _resolve_junctions(self, pl_module: pl.LightningModule, example: Any = None) -> Targets:
        """The targets, found by the probe on ``example``. Without one (before training), by
        tracing only, to refuse early what tracing refuses; what tracing cannot decide waits for
        the probe (see :func:`~lightning_neuronprune.validation.check_against_targets`)."""
        if example is not None:
            targets = resolve_targets(
                pl_module, self.targets, example=example,
                forward_context=self._forward.get("forward_context"),
            )  # fmt: skip
        else:
            try:
                with warnings.catch_warnings():  # an untraced explicit consumer: the probe checks
                    warnings.simplefilter("ignore", UserWarning)
                    targets = resolve_targets(pl_module, self.targets)
            except UndecidedJunctionError as err:
                log.debug("targets left to the probe: %s", err)
                return Targets([])
        try:
            self._joint_layers = check_against_targets(
                targets, self.apply, self.joint_order, self.joint_shares
            )
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        return targets

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
    ) -> Decision:  # fmt: skip
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
            higher_is_better=metric_direction(metric),
            margin=self.confirm_margin, confidence=self.confirm_confidence,
            max_tries=self.confirm_max_tries,
        )  # fmt: skip
        for c in self.confirmations:
            bound = "" if c.upper_bound is None else f" (upper bound {c.upper_bound:+.4f})"
            self._info(
                f"neuron elimination [confirm] {point_label(c.point)}: drop "
                f"{c.search_drop:+.4f} on the search part, {c.confirmed_drop:+.4f} held out{bound}"
                " -> " + ("kept" if c.held else "rejected")
            )
        if chosen is None:
            rank_zero_warn(
                f"NeuronEliminationCallback: no configuration within the budget "
                f"{self.max_accuracy_drop} on the search part kept it on the held-out part "
                f"({len(self.confirmations)} tried); the model is left unchanged"
            )
            return Decision()
        return decision_for(chosen, junctions)

    def _reduce(
        self, module: torch.nn.Module, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], pt: SweepPoint | JointPoint,
    ) -> None:  # fmt: skip
        """Apply one evaluated configuration to ``module`` in place, exactly as evaluated."""
        if isinstance(pt, JointPoint):
            self._search.apply(module, pt)  # type: ignore[union-attr]
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
        eval_loader = get_eval_loader(trainer, self.eval_dataloader)
        train_loader = get_train_loader(trainer)
        device = trainer.strategy.root_device
        pl_module.to(device)
        self._forward = trainer_forward(trainer)
        self.reduced_checkpoint_path = self.source_checkpoint_path = None
        if self.weights == "best":
            self.source_checkpoint_path = load_best(trainer, pl_module)
            self._info(f"neuron elimination: reducing the weights of {self.source_checkpoint_path}")
        junctions = self._resolve_junctions(
            pl_module, self._first_input(train_loader, device, self.probe_samples)
        )

        stats = self._collect(trainer, pl_module, junctions, train_loader, device)
        example = self._example(eval_loader, device)
        metric = self._metric(pl_module, example, device)
        self._fitters.clear()
        search_loader, held_out = self._split_eval(eval_loader)
        search = None
        try:
            self.points = self._sweep(
                trainer, pl_module, junctions, stats, search_loader, metric, example, device
            )
            every = [pt for pts in self.points.values() for pt in pts]
            self.results = [pt.as_dict() for pt in every]
            search = self._joint(
                trainer, pl_module, junctions, stats, search_loader, train_loader, metric, example
            )
        finally:
            self._fitters.clear()  # they hold n × n matrices per junction
        self._search = search  # applies joint points as they were fitted; dropped after
        try:
            self.result = self._decide(every, junctions)
            if held_out is not None and self.apply == "max_energy_saving":
                self.result = self._confirm(
                    pl_module, junctions, stats, every, held_out, metric, device
                )
            self.chosen = self.result.chosen
            self._report(trainer, every)
            before = dict(pl_module.named_parameters())
            self._apply(pl_module, junctions, stats)
        finally:
            self._search = None
        if self.result.plan:
            self._save_reduced(trainer, pl_module, before)
        self._info(
            f"neuron elimination finished in {time.perf_counter() - started:.1f}s: "
            + (f"applied {self.applied}" if self.applied else "model unchanged")
        )

    def _collect(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, junctions: list[Junction],
        loader: Iterable[Any], device: torch.device,
    ) -> dict[str, JunctionStatistics]:  # fmt: skip
        self._info(
            f"neuron elimination: collecting statistics of {[j.layer for j in junctions]} "
            f"(max {self.max_samples} samples per process)"
        )
        total = sample_count(loader, self.max_samples)
        with ProgressBar(trainer, "Neuron elimination: statistics", total, "samples") as bar:
            return collect_statistics(
                pl_module, [j.consumer for j in junctions], loader, max_samples=self.max_samples,
                device=device, progress=bar.update, **self._forward_kwargs(),
                input_fn=self.input_fn, mask_fn=self.mask_fn,
            )  # fmt: skip

    def _example(self, loader: Iterable[Any], device: torch.device) -> Any:
        if self.example_input is not None:
            convert = self._forward.get("convert", lambda x: x)
            return convert(to_device(self.example_input, device))
        return self._first_input(loader, device, 1)

    def _first_input(self, loader: Iterable[Any], device: torch.device, size: int) -> Any:
        return first_input(
            loader, size, device, input_fn=self.input_fn, transfer=self._forward.get("transfer")
        )

    def _metric(self, pl_module: pl.LightningModule, example: Any, device: torch.device) -> Metric:
        if self.metric is not None:
            return self.metric.to(device)
        context = self._forward.get("forward_context") or contextlib.nullcontext
        with evaluating(pl_module), torch.no_grad(), context():
            out = call_model(pl_module, example)
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
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], loader: Iterable[Any], metric: Metric,
        example: Any, device: torch.device,
    ) -> dict[str, list[SweepPoint]]:  # fmt: skip
        options = FitOptions(method=self.method, affine=self.affine, ridge=self.ridge)
        grids = {}
        for j in junctions:
            consumer = pl_module.get_submodule(j.consumer)
            fitter = JunctionFitter(stats[j.consumer], consumer.weight, consumer.bias, options)
            self._fitters[j.layer] = fitter  # the joint search reuses the selection work
            grids[j.layer] = rank_grid(j.num_features, self.ranks, start=fitter.rank)
        # one point for the baseline of each layer, then its grid below n
        sizes = [1 + sum(p != j.num_features for p in grids[j.layer]) for j in junctions]
        points: dict[str, list[SweepPoint]] = {}
        baseline = None
        bar = ProgressBar(trainer, "Neuron elimination: sweep", sum(sizes), "points")
        with bar:
            for i, j in enumerate(junctions, 1):
                evaluator = CachedEvaluator(
                    pl_module, j.consumer, loader, metric, device=device,
                    **self._forward_kwargs(), **self._eval_fns(),
                )  # fmt: skip
                if baseline is None:
                    baseline = (evaluator(), self.energy_model.estimate(pl_module, example))
                    self._info(
                        f"neuron elimination: baseline accuracy {baseline[0]:.4f}, energy "
                        f"{baseline[1].total * 1e6:.3f} µJ"
                    )

                def progress(pt: SweepPoint, i: int = i) -> None:
                    bar.advance()
                    self._info(
                        f"neuron elimination [{i}/{len(junctions)}] {pt.layer}: p={pt.p}/{pt.n} "
                        f"accuracy {pt.accuracy:.4f} (drop {pt.accuracy_drop:+.4f}), energy "
                        f"{pt.energy_ratio:.2f}× lower"
                    )

                points[j.layer] = sweep_junction(
                    pl_module, j, stats[j.consumer], evaluator, self.energy_model, example,
                    ranks=self.ranks, options=options, fitter=self._fitters[j.layer],
                    max_accuracy_drop=self.max_accuracy_drop, baseline=baseline,
                    on_point=progress,
                )  # fmt: skip
                bar.update(sum(sizes[:i]))  # the points after an early stop are skipped
        return points

    def _joint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, junctions: list[Junction],
        stats: dict[str, JunctionStatistics], eval_loader: Iterable[Any],
        train_loader: Iterable[Any], metric: Metric, example: Any,
    ) -> JointSearch | None:  # fmt: skip
        self.joint_points = []
        if self.joint is None or len(junctions) < 2:
            return None
        first = self.points[junctions[0].layer][0]  # the unreduced baseline
        self._info(
            f"neuron elimination: joint search ({self.joint}) over {[j.layer for j in junctions]}"
        )

        bar = ProgressBar(
            trainer, f"Neuron elimination: joint search ({self.joint})", None, "points"
        )

        def progress(pt: JointPoint) -> None:
            bar.advance()
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
        with bar:
            if self.joint == "greedy":
                self.joint_points = search.greedy(
                    self.max_accuracy_drop, compensate=self.joint_compensate,
                    slack=self.max_accuracy_drop / 2,
                )  # fmt: skip
            else:
                self.joint_points = search.sequential(
                    self.max_accuracy_drop, order=self._joint_layers, shares=self.joint_shares
                )
        return search

    def _eval_fns(self) -> dict[str, Any]:
        return {"input_fn": self.input_fn, "target_fn": self.target_fn, "output_fn": self.output_fn}

    def _data_fns(self) -> dict[str, Any]:
        return {**self._eval_fns(), "mask_fn": self.mask_fn}

    def _decide(self, every: list[SweepPoint], junctions: list[Junction]) -> Decision:
        decision = decide(every, self.joint_points, junctions, self.apply, self.max_accuracy_drop)
        if self.apply is not None and not isinstance(self.apply, dict) and not decision.plan:
            rank_zero_warn(
                f"NeuronEliminationCallback: no configuration keeps the accuracy drop within "
                f"{self.max_accuracy_drop}; the model is left unchanged"
            )
        return decision

    def _report(self, trainer: pl.Trainer, every: list[SweepPoint]) -> None:
        if trainer.loggers:
            log_scalars(trainer.loggers, every)
            if self.joint_points:
                log_joint_scalars(trainer.loggers, self.joint_points)
            log_confirmations(trainer.loggers, self.confirmations)
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it.
        directory = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        log_summary(
            trainer.loggers, self.points, self.joint_points, self.chosen,
            confirmations=self.confirmations,
            extra_table=confirmation_table(
                self.confirmations, self.confirm_fraction, self.max_accuracy_drop,
                self.confirm_margin, self.confirm_confidence,
            ) if self.confirmations else "",
        )  # fmt: skip
        self.report_paths = write_report(
            directory, every, self.chosen,
            extra={
                "applied": dict(self.result.plan),
                "joint": [pt.as_dict() for pt in self.joint_points],
                "weights": self.weights,
                "source_checkpoint": self.source_checkpoint_path,
                "reduced_checkpoint": None,
                "joint_front": [pt.as_dict() for pt in pareto_front(self.joint_points)],
                "confirm_fraction": self.confirm_fraction,
                "confirmation": [c.as_dict() for c in self.confirmations],
            },
        )  # fmt: skip
        if self.confirmations:
            self.report_paths = (
                *self.report_paths,
                write_confirmation_csv(directory, self.confirmations),
            )
        self._info(f"neuron elimination: report written to {self.report_paths[0]}")

    def _apply(
        self, pl_module: pl.LightningModule, junctions: list[Junction],
        stats: dict[str, JunctionStatistics],
    ) -> None:  # fmt: skip
        decision = self.result
        if not decision.plan:
            return
        if isinstance(decision.chosen, JointPoint) and self._search is not None:
            self._search.apply(pl_module, decision.chosen)
        else:
            apply_decision(
                pl_module, junctions, decision, stats,
                FitOptions(method=self.method, affine=self.affine, ridge=self.ridge),
            )  # fmt: skip
        self.applied = dict(decision.plan)
        self._info(f"neuron elimination: applied {self.applied}")

    # ------------------------------------------------------- precision and checkpoints

    def _forward_kwargs(self) -> dict[str, Any]:
        """``transfer`` and ``forward_context`` for the functional core (empty outside a run)."""
        return {k: v for k, v in self._forward.items() if k in ("transfer", "forward_context")}

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
        path = reduced_checkpoint_path(trainer, self.source_checkpoint_path)
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
