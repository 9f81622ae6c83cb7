"""``NeuronEliminationCallback``: the Lightning shell around the functional core."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import Metric
from typing_extensions import override

from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.recording import collect_statistics, first_input
from lightning_neuronprune.core.runtime import to_device
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.lightning.deprecated import DeprecatedAttributes, deprecated_arguments
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
from lightning_neuronprune.search.decision import Decision, decision_for
from lightning_neuronprune.search.evaluation import default_metric
from lightning_neuronprune.search.pipeline import ModelIO, ReductionSearch, SearchResult
from lightning_neuronprune.search.settings import (
    ConfirmSettings,
    DataOptions,
    JointSettings,
    SearchSettings,
    parse_budget,
    settings_from,
)
from lightning_neuronprune.search.streaming import run_plan
from lightning_neuronprune.search.validation import (
    check_against_targets,
    check_choice,
    check_targets,
)
from lightning_neuronprune.structure.conv import statistics_channels
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.persistence import install_plan_hook
from lightning_neuronprune.structure.targets import Targets, resolve_targets, traced_targets

__all__ = ["NeuronEliminationCallback"]

log = logging.getLogger(__name__)

WEIGHTS = ("last", "best")


class NeuronEliminationCallback(DeprecatedAttributes, pl.Callback):
    r"""Remove redundant neurons of ``nn.Linear`` layers when training ends, without retraining.

    When ``trainer.fit`` finishes normally, the callback

    1. streams the input statistics of every target's consumer over the training data
       (all-reduced under DDP, so every rank holds the same numbers);
    2. for every target and every p of the rank grid, selects p neurons, re-fits the consumer by
       least squares, and measures the metric on the evaluation data and the modelled energy
       (Algorithm 1 of Zhang, Davoodi & Hu 2018; the sweep of a layer stops once the accuracy
       degradation exceeds ``max_degradation``);
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
        targets: layer names, or ``"auto"`` for every ``nn.Linear`` whose output neurons (and
            every ``Conv1d``/``Conv2d`` whose output channels) have a consumer. ``"fc1"`` removes
            fc1's output neurons, ``"conv1"`` conv1's output channels; ``"fc1:in"`` removes fc1's
            input features (the paper's "FC1" row of LeNet-300-100). A mapping
            ``{target: consumer}`` names the consumers too (checked by the probe). Junctions are
            found by a probe on a few samples of the first training batch (see
            :mod:`~lightning_neuronprune.structure.probe`), cross-checked by :mod:`torch.fx`
            where the model traces (``"auto"`` finds conv junctions by tracing only): it finds
            the FFN pairs of transformer blocks (BERT's ``intermediate.dense`` →
            ``output.dense``, DistilBERT's ``lin1`` → ``lin2``, ``fc1`` → ``fc2``) through custom
            activation modules and untraceable ``forward``\ s.
        max_degradation: the budget: how much worse the metric may get. A number is in the
            metric's units (``0.02`` = 2 points of accuracy; for a loss or perplexity, whose
            ``higher_is_better`` is ``False``, an increase); a string ``"N%"`` is relative to the
            unreduced model's value (``"5%"``: perplexity may rise by 5 %).
        ranks: the grid of p per layer: ``"auto"`` (every p up to 64 features, else 48 points plus
            a dense tail), ``"all"`` (every p, Algorithm 1), an int step, a list of ints, or a list
            of fractions of n.
        apply: ``"max_energy_saving"`` (the lowest-energy configuration within the budget,
            across all targets, confirmed on held-out data), ``None`` (report only), or
            ``{layer: p}`` (applied by streamed fits, one junction at a time, no search).
        fit: selection and least-squares options
            (:class:`~lightning_neuronprune.core.fitting.FitOptions`); the default selects with
            ``method="output"``, which keeps fewer neurons than the paper's ``"svd_qr"`` at the
            paper's drops in all five MNIST rows (docs/RESULTS.md).
        joint: with several targets, also search joint configurations of all of them under the
            one budget (:class:`~lightning_neuronprune.search.settings.JointSettings`, or its
            strategy name ``"greedy"``/``"sequential"``/``"allocate"``; ``"allocate"`` runs no
            per-layer sweep and at most ``max_evaluations`` evaluations, for many junctions), or
            ``None`` for single layers only.
        confirm: the held-out confirmation of the choice
            (:class:`~lightning_neuronprune.search.settings.ConfirmSettings`). By default half of
            the evaluation samples are held out and the chosen configuration must keep the
            budget there with 90 % confidence (an upper confidence bound on its drop, corrected
            for the candidates tried); ``None`` trusts the search part alone.
        metric: a ``torchmetrics.Metric`` over ``(predictions, target)``; the default is
            multiclass top-1 accuracy, with the class count read from the model output. Its
            ``higher_is_better`` sets the direction of the budget.
        energy_model: the energy model (default: 45 nm constants).
        max_samples: samples (per process) used for the statistics.
        eval_dataloader: evaluate on this instead of the validation dataloader.
        example_input: one input for the energy model; by default the LightningModule's
            ``example_input_array``, else the first evaluation sample of rank zero.
        data: how batches are read
            (:class:`~lightning_neuronprune.search.settings.DataOptions`: the input, target,
            output and padding-mask adapters, and the probe's sample count).
        weights: ``"last"`` reduces the weights that training ended with; ``"best"`` those of the
            Trainer's ``ModelCheckpoint.best_model_path`` (a ``ModelCheckpoint`` is required;
            without ``monitor`` its "best" is its latest checkpoint).
        verbose: log a line per evaluated configuration (rank zero).

    The names of the previous release (``max_accuracy_drop``, ``method``, ``affine``, ``ridge``,
    ``top_k``, ``joint_order``, ``joint_shares``, ``joint_compensate``, ``confirm_*``,
    ``input_fn``, ``target_fn``, ``output_fn``, ``mask_fn``, ``probe_samples``) are still
    accepted as keywords, with a ``FutureWarning``; so are the attributes ``results``,
    ``points``, ``joint_points``, ``chosen``, ``confirmations`` and ``applied``.

    Attributes:
        settings: the search's :class:`~lightning_neuronprune.search.settings.SearchSettings`,
            made from the arguments (the core runs the search:
            :mod:`~lightning_neuronprune.search.pipeline`).
        result: the :class:`~lightning_neuronprune.search.pipeline.SearchResult` of the last
            run (every point, the decision, the confirmations, the budget in metric units and
            whether it was applied), or ``None`` before a run or after a failed one.
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
        max_degradation: float | str = 0.02,
        ranks: str | int | list[int] | list[float] = "auto",
        apply: str | dict[str, int] | None = "max_energy_saving",
        fit: FitOptions | None = None,
        joint: JointSettings | str | None = "greedy",
        confirm: ConfirmSettings | None = ConfirmSettings(),  # noqa: B008 (frozen)
        metric: Metric | None = None,
        energy_model: EnergyModel | None = None,
        max_samples: int | None = 60_000,
        eval_dataloader: DataLoader | None = None,
        example_input: Tensor | None = None,
        data: DataOptions | None = None,
        weights: str = "last",
        verbose: bool = False,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        try:
            fit, confirm, data = (
                settings_from(cls, value, name)
                for cls, value, name in (
                    (FitOptions, fit, "fit"), (ConfirmSettings, confirm, "confirm"),
                    (DataOptions, data, "data"),
                )
            )  # fmt: skip
            joint = settings_from(JointSettings, joint, "joint")
            old = deprecated_arguments(deprecated, fit=fit, joint=joint, confirm=confirm, data=data)
            max_degradation = old.pop("max_degradation", max_degradation)
            fit, joint, confirm, data = old["fit"], old["joint"], old["confirm"], old["data"]
            self.top_k: int = old["top_k"]
            targets = check_targets(targets)
            amount, relative = parse_budget(max_degradation)
            self.settings = SearchSettings(
                ranks=ranks, max_degradation=amount, relative=relative,
                options=fit if fit is not None else FitOptions(method="output"), apply=apply,
                joint=joint, max_samples=max_samples, confirm=confirm,
            )  # fmt: skip
            self.data = data if data is not None else DataOptions()
            check_choice("weights", weights, WEIGHTS)
            check_choice("verbose", verbose, (True, False))
            if energy_model is not None and not isinstance(energy_model, EnergyModel):
                raise ValueError(
                    f"`energy_model` must be an EnergyModel, got {type(energy_model).__name__} "
                    f"{energy_model!r}"
                )
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(str(err)) from err
        if metric is not None and not isinstance(metric, Metric):
            raise MisconfigurationException(
                f"`metric` must be a torchmetrics.Metric, got {type(metric).__name__}"
            )
        self.targets = targets
        self.metric = metric
        self.energy_model = energy_model or EnergyModel()
        self.eval_dataloader = eval_dataloader
        self.example_input = example_input
        self.verbose = verbose
        self.weights = weights

        self.result: SearchResult | None = None
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
        # A new fit starts from a clean slate: nothing of an earlier fit's run is left to be
        # mistaken for this one's if it fails.
        self.result, self.report_paths = None, ()
        self.reduced_checkpoint_path = self.source_checkpoint_path = None
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
            order, shares = (s.joint.order, s.joint.shares) if s.joint else (None, None)
            self._joint_layers = check_against_targets(targets, s.apply, order, shares)
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
        d = self.data
        io = trainer_io(trainer, device, **d.adapters(), info=self._info)
        if self.weights == "best":
            self.source_checkpoint_path = load_best(trainer, pl_module)
            self._info(f"neuron elimination: reducing the weights of {self.source_checkpoint_path}")
        adapt = {"input_fn": d.input_fn, "transfer": io.transfer}
        example = first_input(train_loader, d.probe_samples, device, **adapt)
        probed = resolve_targets(
            pl_module, self.targets, example=example, forward_context=io.forward_context
        )  # each rank probes its own batch: every rank reduces rank zero's junctions
        junctions = self._resolve_junctions(
            pl_module, Targets(trainer.strategy.broadcast(list(probed)))
        )
        before = dict(pl_module.named_parameters())
        example = self._energy_example(trainer, pl_module, eval_loader, adapt)
        data = (eval_loader, self._metric(pl_module, example, io), example, train_loader)
        if isinstance(self.settings.apply, Mapping):  # a fixed plan: streamed fits, no search
            s, energy = self.settings, self.energy_model
            self.result = result = run_plan(pl_module, junctions, s, energy, *data, io)[0]
            self._report(trainer, result)
        else:
            result = self._search(trainer, pl_module, junctions, data, io)
        if result.applied:
            source = self.source_checkpoint_path
            path = self.reduced_checkpoint_path = save_reduced_checkpoint(
                trainer, pl_module, before, source
            )
            if path is not None and trainer.is_global_zero and self.report_paths:
                amend_report(self.report_paths[0], reduced_checkpoint=path)
        self._info(
            f"neuron elimination finished in {time.perf_counter() - started:.1f}s: "
            + (f"applied {dict(result.decision.plan)}" if result.applied else "model unchanged")
        )

    def _search(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, junctions: Targets,
        data: tuple[Iterable[Any], Metric, Any, Iterable[Any]], io: ModelIO,
    ) -> SearchResult:  # fmt: skip
        """Statistics of every junction, the search, the decision, and applying it."""
        eval_loader, metric, example, train_loader = data
        stats = self._collect(pl_module, junctions, train_loader, io)
        settings = self.settings
        if settings.joint is not None and self._joint_layers is not None:
            joint = dataclasses.replace(settings.joint, order=tuple(self._joint_layers))
            settings = dataclasses.replace(settings, joint=joint)
        search = ReductionSearch(pl_module, junctions, stats, self.energy_model, settings, io)
        try:
            result = search.run(eval_loader, metric, example, train_data=train_loader)
            result = self._rank_zero_decision(trainer, result, junctions)
            decision = result.decision
            self.result = result
            self._report(trainer, result)
            if decision.plan:
                search.apply(pl_module, decision)
                self.result = result = dataclasses.replace(result, applied=True)
                self._info(f"neuron elimination: applied {dict(decision.plan)}")
        finally:
            search.close()
        return result

    def _rank_zero_decision(
        self, trainer: pl.Trainer, result: SearchResult, junctions: list[Junction]
    ) -> SearchResult:
        """Every rank applies rank zero's decision. The ranks measured the same numbers (synced
        metric, rank zero's energy example), so rank zero names its choice by its position among
        the points, and each rank applies its own copy of that point (a joint point is applied
        from the fits its search kept)."""
        points = [*result.every, *result.joint_points]
        chosen = result.decision.chosen
        index = next((i for i, pt in enumerate(points) if pt is chosen), None)
        plan = dict(result.decision.plan)
        index0, plan0 = trainer.strategy.broadcast((index, plan))
        if (index0, plan0) == (index, plan):
            return result
        if index0 is not None and index0 < len(points):
            decision = decision_for(points[index0], junctions)
        else:
            decision = Decision(None, plan0)
        return dataclasses.replace(result, decision=decision)

    def _energy_example(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable[Any],
        adapt: dict[str, Any],
    ) -> Any:  # fmt: skip
        """One input for the energy model, the same on every rank: ``example_input``, else the
        LightningModule's ``example_input_array``, else rank zero's first evaluation sample."""
        device = trainer.strategy.root_device
        given = self.example_input
        if given is None:
            given = getattr(pl_module, "example_input_array", None)
        if given is not None:
            return trainer.precision_plugin.convert_input(to_device(given, device))
        example = first_input(loader, 1, device, **adapt)
        return to_device(trainer.strategy.broadcast(example), device)

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
                channels=statistics_channels(pl_module, junctions), **io.forward_kwargs(),
            )  # fmt: skip

    def _metric(self, pl_module: pl.LightningModule, example: Any, io: ModelIO) -> Metric:
        if self.metric is not None:
            return self.metric.to(io.device)
        try:
            return default_metric(
                pl_module, example, top_k=self.top_k, output_fn=self.data.output_fn,
                forward_context=io.forward_context,
            )  # fmt: skip
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err

    def _report(self, trainer: pl.Trainer, result: SearchResult) -> None:
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it.
        directory = trainer.log_dir or trainer.default_root_dir
        self.report_paths = report_result(
            trainer.loggers, directory, result, write=trainer.is_global_zero,
            confirm=self.settings.confirm, budget=result.budget,
            extra={
                "weights": self.weights, "source_checkpoint": self.source_checkpoint_path,
                "reduced_checkpoint": None,
            },
        )  # fmt: skip
        if self.report_paths:
            self._info(f"neuron elimination: report written to {self.report_paths[0]}")
