"""``NeuronEliminationCallback``: the Lightning shell around the functional core."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import Metric
from typing_extensions import override

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.runtime import to_device
from lightning_neuronprune.core.statistics import (
    JunctionStatistics,
    collect_statistics,
    first_input,
)
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.lightning.progress import sample_count
from lightning_neuronprune.lightning.reporting import amend_report, report_result
from lightning_neuronprune.lightning.trainer import (
    NO_EVAL_DATA,
    best_checkpoint,
    has_val_source,
    load_best,
    save_reduced_checkpoint,
    trainer_io,
)
from lightning_neuronprune.lightning.trainer import eval_loader as get_eval_loader
from lightning_neuronprune.lightning.trainer import train_loader as get_train_loader
from lightning_neuronprune.search.confirmation import Confirmation
from lightning_neuronprune.search.decision import Decision
from lightning_neuronprune.search.evaluation import default_metric
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.pipeline import (
    ConfirmSettings,
    ModelIO,
    ReductionSearch,
    SearchResult,
    SearchSettings,
)
from lightning_neuronprune.search.sweep import SweepPoint
from lightning_neuronprune.search.validation import (
    check_against_targets,
    check_arguments,
    check_choice,
)
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.persistence import install_plan_hook
from lightning_neuronprune.structure.targets import Targets, resolve_targets, traced_targets

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

    Checkpoints: ``trainer.fit/validate/test/predict(ckpt_path=<reduced checkpoint>)`` work on a
    fresh instance (``setup`` makes ``load_state_dict`` rebuild the reduced shapes first), and
    ``ckpt_path="best"`` after a reduction refuses with a
    :class:`~lightning_neuronprune.errors.CheckpointMismatchError` naming the reduced checkpoint
    (see :mod:`~lightning_neuronprune.structure.persistence`).

    Work runs in ``on_train_end``, while the model is still on the training device and the
    process group is alive. Every rank performs the same reduction; only rank zero reports.

    Args:
        targets: layer names, or ``"auto"`` for every ``nn.Linear`` whose output neurons have a
            consumer. ``"fc1"`` removes fc1's output neurons; ``"fc1:in"`` removes fc1's input
            features (the paper's "FC1" row of LeNet-300-100). A mapping ``{target: consumer}``
            names the consumers too (checked by the probe). Junctions are found by a probe on
            ``probe_samples`` samples of the first training batch (see
            :mod:`~lightning_neuronprune.structure.probe`), cross-checked by :mod:`torch.fx` where
            the
            model traces: ``"auto"`` finds the FFN pairs of transformer blocks (BERT's
            ``intermediate.dense`` → ``output.dense``, DistilBERT's ``lin1`` → ``lin2``, ``fc1``
            → ``fc2``) through custom activation modules and untraceable ``forward``\ s.
        ranks: the grid of p per layer: ``"auto"`` (every p up to 64 features, else 48 points plus
            a dense tail), ``"all"`` (every p, Algorithm 1), an int step, a list of ints, or a list
            of fractions of n.
        max_accuracy_drop: the degradation threshold ε, as a fraction (0.02 = 2 points).
        method: ``"svd_qr"`` (the paper's Algorithm 2), ``"qr"`` (nested pivoted Cholesky) or
            ``"output"`` (output-aware greedy: the neurons that best explain the consumer's
            output ``W X``; see :func:`~lightning_neuronprune.core.selection.output_order`). The
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
            :mod:`~lightning_neuronprune.search.joint`.
        joint_order: the layer order of the sequential strategy (default: network order).
        joint_shares: the budget shares of the sequential strategy (default: equal).
        joint_compensate: with ``joint="greedy"``, also re-fit the greedy path with
            compensating fits (each consumer fitted to the original network's output from the
            reduced network's kept features, :mod:`~lightning_neuronprune.search.compensation`),
            exploring up to 1.5 × the budget and trying the cheapest configurations first.
        confirm_fraction: the share of the evaluation samples held out to confirm the choice
            (``None`` or 0: no confirmation; the budget is then checked only on the data the
            search compared configurations on). The evaluation data is split deterministically,
            by a fixed hash of each sample's position (see
            :mod:`~lightning_neuronprune.search.confirmation`); the sweeps
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
            (:func:`~lightning_neuronprune.core.statistics.batch_input`) takes ``x`` of ``(x, y)``,
            and
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
        settings: the search's :class:`~lightning_neuronprune.search.pipeline.SearchSettings`, made
            from the arguments (the core runs the search:
            :mod:`~lightning_neuronprune.search.pipeline`).
        results: one dict per evaluated point (see :meth:`SweepPoint.as_dict`).
        points: ``{layer: [SweepPoint, ...]}``.
        chosen: the applied :class:`SweepPoint` or :class:`JointPoint`, or ``None``.
        result: the :class:`~lightning_neuronprune.search.decision.Decision`, made once; the report
            and the reduced model both follow it.
        confirmations: the candidates re-measured on the held-out part, in the order tried
            (:class:`~lightning_neuronprune.search.confirmation.Confirmation`).
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
            check_choice("joint_compensate", joint_compensate, (True, False))
            check_choice("weights", weights, WEIGHTS)
            self.settings = SearchSettings(
                ranks=ranks, max_accuracy_drop=max_accuracy_drop,
                options=FitOptions(method=method, affine=affine, ridge=ridge), apply=apply,
                joint=joint, joint_order=joint_order, joint_shares=joint_shares,
                joint_compensate=joint_compensate, max_samples=max_samples,
                confirm=ConfirmSettings(
                    confirm_fraction or 0.0, confirm_margin, confirm_confidence, confirm_chunk,
                    confirm_max_tries,
                ),
            )  # fmt: skip
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(str(err)) from err
        if metric is not None and not isinstance(metric, Metric):
            raise MisconfigurationException(
                f"`metric` must be a torchmetrics.Metric, got {type(metric).__name__}"
            )
        self.targets = targets
        self.metric = metric
        self.top_k = top_k
        self.energy_model = energy_model or EnergyModel()
        self.eval_dataloader = eval_dataloader
        self.example_input = example_input
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
        self._failed = False
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

    def _resolve_junctions(
        self, pl_module: pl.LightningModule, targets: Targets | None = None
    ) -> Targets:
        """Check ``targets`` (found by the probe) against ``apply`` and the joint options.
        Without them (before training), the targets by tracing only, to refuse early what tracing
        refuses; what tracing cannot decide waits for the probe (see
        :func:`~lightning_neuronprune.search.validation.check_against_targets`)."""
        if targets is None:
            targets = traced_targets(pl_module, self.targets)
        try:
            s = self.settings
            self._joint_layers = check_against_targets(
                targets, s.apply, s.joint_order, s.joint_shares
            )
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        return targets

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(message)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        eval_loader = get_eval_loader(trainer, self.eval_dataloader)
        train_loader = get_train_loader(trainer)
        device = trainer.strategy.root_device
        pl_module.to(device)
        io = trainer_io(
            trainer, device, input_fn=self.input_fn, target_fn=self.target_fn,
            output_fn=self.output_fn, mask_fn=self.mask_fn, info=self._info,
        )  # fmt: skip
        self.reduced_checkpoint_path = self.source_checkpoint_path = None
        self.applied, self.report_paths = {}, ()
        if self.weights == "best":
            self.source_checkpoint_path = load_best(trainer, pl_module)
            self._info(f"neuron elimination: reducing the weights of {self.source_checkpoint_path}")
        adapt = {"input_fn": self.input_fn, "transfer": io.transfer}
        example = first_input(train_loader, self.probe_samples, device, **adapt)
        probed = resolve_targets(
            pl_module, self.targets, example=example, forward_context=io.forward_context
        )  # each rank probes its own batch: every rank reduces rank zero's junctions
        junctions = self._resolve_junctions(
            pl_module, Targets(trainer.strategy.broadcast(list(probed)))
        )
        stats = self._collect(pl_module, junctions, train_loader, io)
        if self.example_input is None:
            example = first_input(eval_loader, 1, device, **adapt)
        else:
            example = trainer.precision_plugin.convert_input(to_device(self.example_input, device))
        metric = self._metric(pl_module, example, io)
        settings = dataclasses.replace(self.settings, joint_order=self._joint_layers)
        search = ReductionSearch(pl_module, junctions, stats, self.energy_model, settings, io)
        try:
            result = search.run(eval_loader, metric, example, train_data=train_loader)
            self.points, self.joint_points = dict(result.points), result.joint_points
            self.results = [pt.as_dict() for pt in result.every]
            self.result, self.chosen = result.decision, result.decision.chosen
            self.confirmations = result.confirmations
            self._report(trainer, result)
            before = dict(pl_module.named_parameters())
            if result.decision.plan:
                search.apply(pl_module, result.decision)
                self.applied = dict(result.decision.plan)
                self._info(f"neuron elimination: applied {self.applied}")
        finally:
            search.close()
        if result.decision.plan:
            source = self.source_checkpoint_path
            path = self.reduced_checkpoint_path = save_reduced_checkpoint(
                trainer, pl_module, before, source
            )
            if path is not None and trainer.is_global_zero and self.report_paths:
                amend_report(self.report_paths[0], reduced_checkpoint=path)
        self._info(
            f"neuron elimination finished in {time.perf_counter() - started:.1f}s: "
            + (f"applied {self.applied}" if self.applied else "model unchanged")
        )

    def _collect(
        self, pl_module: pl.LightningModule, junctions: list[Junction], loader: Iterable[Any],
        io: ModelIO,
    ) -> dict[str, JunctionStatistics]:  # fmt: skip
        layers, limit = [j.layer for j in junctions], self.settings.max_samples
        self._info(
            f"neuron elimination: collecting statistics of {layers} (max {limit} per process)"
        )
        total = sample_count(loader, limit)
        with io.progress("Neuron elimination: statistics", total, "samples") as bar:
            return collect_statistics(
                pl_module, [j.consumer for j in junctions], loader, max_samples=limit,
                device=io.device, progress=bar.update, input_fn=io.input_fn, mask_fn=io.mask_fn,
                **io.forward_kwargs(),
            )  # fmt: skip

    def _metric(self, pl_module: pl.LightningModule, example: Any, io: ModelIO) -> Metric:
        if self.metric is not None:
            return self.metric.to(io.device)
        try:
            return default_metric(
                pl_module, example, top_k=self.top_k, output_fn=self.output_fn,
                forward_context=io.forward_context,
            )  # fmt: skip
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err

    def _report(self, trainer: pl.Trainer, result: SearchResult) -> None:
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it.
        directory = trainer.log_dir or trainer.default_root_dir
        self.report_paths = report_result(
            trainer.loggers, directory, result, write=trainer.is_global_zero,
            confirm=self.settings.confirm, budget=self.settings.max_accuracy_drop,
            extra={
                "weights": self.weights, "source_checkpoint": self.source_checkpoint_path,
                "reduced_checkpoint": None,
            },
        )  # fmt: skip
        if self.report_paths:
            self._info(f"neuron elimination: report written to {self.report_paths[0]}")
