"""What the callback reads from and writes to the Trainer: data, precision and checkpoints.

These helpers hold the Lightning-specific glue, so that the callback's hooks stay short and the
functional core never sees a Trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_neuronprune.lightning.progress import ProgressBar
from lightning_neuronprune.search.pipeline import ModelIO
from lightning_neuronprune.structure.persistence import install_plan_hook, rebind_optimizer

__all__ = [
    "best_checkpoint",
    "eval_loader",
    "has_val_source",
    "load_best",
    "reduced_checkpoint_path",
    "save_reduced_checkpoint",
    "train_loader",
    "trainer_io",
]

NO_EVAL_DATA = (
    "NeuronEliminationCallback needs evaluation data: give the LightningModule or datamodule a "
    "`val_dataloader`, or pass `eval_dataloader=`"
)


def eval_loader(trainer: pl.Trainer, loader: Iterable[Any] | None = None) -> Iterable[Any]:
    """``loader``, else the fit's (first) validation dataloader; refused when missing or empty."""
    if loader is None:
        if trainer.val_dataloaders is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
    if loader is None:
        raise MisconfigurationException(NO_EVAL_DATA)
    check_nonempty(loader, "evaluation")
    return loader


def train_loader(trainer: pl.Trainer) -> Iterable[Any]:
    """The fit's training dataloader; refused when missing or empty."""
    loader = trainer.train_dataloader
    if loader is None:
        raise MisconfigurationException("NeuronEliminationCallback found no training dataloader")
    check_nonempty(loader, "training")
    return loader


def best_checkpoint(trainer: pl.Trainer, *, check_path: bool = True) -> str:
    """ModelCheckpoint's best checkpoint path (``weights="best"``); refused when there is none."""
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


def load_best(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
    """Load ModelCheckpoint's best weights into ``pl_module`` (every rank), in place; return the
    checkpoint's path."""
    # Under DDP every rank reduces rank zero's best (ranks may rank their own metrics apart).
    path = trainer.strategy.broadcast(best_checkpoint(trainer))
    checkpoint = trainer.strategy.load_checkpoint(path)
    trainer.strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
    return str(path)


def reduced_checkpoint_path(trainer: pl.Trainer, source: str | None) -> str | None:
    """``<ModelCheckpoint.dirpath>/<source stem>-reduced.ckpt`` or ``reduced-step=<k>.ckpt``
    (a fresh name, ``-v1``... when taken); ``None`` without a ModelCheckpoint directory."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if not dirpath:
        return None
    if source:
        stem = os.path.splitext(os.path.basename(source))[0] + "-reduced"
    else:
        stem = f"reduced-step={trainer.global_step}"
    path, version = os.path.join(dirpath, stem + ".ckpt"), 0
    while os.path.exists(path):
        version += 1
        path = os.path.join(dirpath, f"{stem}-v{version}.ckpt")
    return trainer.strategy.broadcast(path)


def save_reduced_checkpoint(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    before: dict[str, Any],
    source: str | None,
) -> str | None:
    """Make the trainer's state consistent with the reduced model and checkpoint it.

    The optimizers are re-pointed at the new parameters (the reduced layers' optimizer state
    starts afresh; ``before`` is ``named_parameters()`` before the reduction), so that the
    checkpoint resumes. It is written with ``trainer.save_checkpoint`` (every rank calls it,
    rank zero writes) next to ``ModelCheckpoint``'s (see :func:`reduced_checkpoint_path`), and
    ``load_state_dict`` is told what to advise when unreduced weights arrive.

    Returns:
        The checkpoint's path, or ``None`` without a ``ModelCheckpoint`` to write it next to.
    """
    for optimizer in trainer.optimizers:
        rebind_optimizer(optimizer, before, pl_module)
    path = reduced_checkpoint_path(trainer, source)
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
        return None
    trainer.save_checkpoint(path)
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
    return path


def trainer_io(trainer: pl.Trainer, device: torch.device, **adapters: Any) -> ModelIO:
    """The :class:`~lightning_neuronprune.search.pipeline.ModelIO` of the Trainer: a raw batch goes
    through the precision plugin's ``convert_input`` then the strategy's ``batch_to_device``
    (as the fit loop does), forward passes run under the precision plugin's
    ``forward_context``, warnings go out on rank zero, progress bars follow the Trainer's style.
    ``adapters`` are the other fields (``input_fn``..., ``info``)."""
    strategy, precision = trainer.strategy, trainer.precision_plugin

    def transfer(batch: Any) -> Any:
        return strategy.batch_to_device(precision.convert_input(batch))

    def progress(description: str, total: int | None, unit: str) -> ProgressBar:
        return ProgressBar(trainer, description, total, unit)

    return ModelIO(
        device=device, transfer=transfer, forward_context=precision.forward_context,
        warn=rank_zero_warn, progress=progress, **adapters,
    )  # fmt: skip


def has_val_source(trainer: pl.Trainer) -> bool:
    """Whether the fit has a validation dataloader (from the module or the datamodule)."""
    try:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        return bool(source.is_defined()) and trainer.limit_val_batches != 0
    except AttributeError:  # pragma: no cover - private API moved; check again in on_train_end
        return True


def check_nonempty(loader: Any, what: str) -> None:
    try:
        size = len(loader)
    except TypeError:
        return
    if size == 0:
        raise MisconfigurationException(f"the {what} dataloader is empty")
