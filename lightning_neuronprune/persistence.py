"""Saving and reloading reduced models with plain data only (``torch.load(weights_only=True)``).

A reduced model carries its *plan* (one record per eliminated junction: names, n, p and kept
indices) as JSON bytes in a ``uint8`` buffer named ``neuron_elimination_plan``. The plan is
therefore part of every ``state_dict`` and of every Lightning checkpoint written afterwards,
with no pickled code. :func:`load_reduced` reads it, rebuilds the reduced shapes on a fresh
instance of the original architecture, then loads the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.surgery import rebuild_shapes

__all__ = ["PLAN_BUFFER", "load_reduced", "read_plan", "save_reduced", "write_plan"]

PLAN_BUFFER = "neuron_elimination_plan"

M = TypeVar("M", bound=nn.Module)


def _encode(plan: list[dict[str, Any]]) -> Tensor:
    return torch.tensor(list(json.dumps(plan, sort_keys=True).encode()), dtype=torch.uint8)


def _decode(buffer: Tensor) -> list[dict[str, Any]]:
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def write_plan(model: nn.Module, plan: list[dict[str, Any]]) -> None:
    """Store ``plan`` (plain dicts) in ``model``'s ``neuron_elimination_plan`` buffer."""
    device = next((t.device for t in model.buffers()), None) or next(
        (t.device for t in model.parameters()), torch.device("cpu")
    )
    if PLAN_BUFFER in model._buffers:
        del model._buffers[PLAN_BUFFER]
    model.register_buffer(PLAN_BUFFER, _encode(plan).to(device))


def read_plan(source: nn.Module | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The plan of a reduced model or ``state_dict`` (``[]`` if it was never reduced)."""
    if isinstance(source, nn.Module):
        buffer = source._buffers.get(PLAN_BUFFER)
        return _decode(buffer) if buffer is not None else []
    buffer = source.get(PLAN_BUFFER)
    return _decode(buffer) if isinstance(buffer, Tensor) else []


def save_reduced(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a reduced model's ``state_dict`` (weights and plan) to ``path``."""
    torch.save(model.state_dict(), path)


def load_reduced(
    model: M,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
) -> M:
    """Load a reduced model into ``model``, a fresh instance of the original architecture.

    Works for files from :func:`save_reduced` or ``torch.save(model.state_dict())``, for Lightning
    checkpoints written after the reduction (their ``"state_dict"`` entry is used), and for an
    in-memory ``state_dict``. Files are read with ``torch.load(weights_only=True)``.

    Args:
        model: a fresh, unreduced instance (e.g. ``MyLightningModule(**hparams)``); modified in
            place and returned.
        source: a path or a ``state_dict``.
        map_location: passed to ``torch.load``.
        strict: passed to ``load_state_dict``.

    Returns:
        ``model``, with the reduced shapes and the saved weights.

    Raises:
        NeuronEliminationError: the saved plan names layers that ``model`` does not have.
    """
    if isinstance(source, Mapping):
        state = source
    else:
        state = torch.load(source, map_location=map_location, weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    for key in sorted(k for k in state if k == PLAN_BUFFER or k.endswith("." + PLAN_BUFFER)):
        prefix = key[: -len(PLAN_BUFFER)].rstrip(".")
        try:
            owner = model.get_submodule(prefix) if prefix else model
        except AttributeError as err:
            raise NeuronEliminationError(
                f"the saved plan belongs to submodule {prefix!r}, which {type(model).__name__} "
                "does not have"
            ) from err
        plan = _decode(state[key])
        try:
            rebuild_shapes(owner, plan)
        except Exception as err:
            raise NeuronEliminationError(
                f"cannot replay the saved plan on {type(model).__name__}: {err}"
            ) from err
        write_plan(owner, plan)
    model.load_state_dict(state, strict=strict)
    return model
