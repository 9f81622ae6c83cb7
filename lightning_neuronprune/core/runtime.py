"""Running a model for measurement: eval mode, its device, moving batches there.

One helper each, shared by statistics, evaluation, the energy model and the callback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch import nn

__all__ = ["evaluating", "model_device", "to_device"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode; restore each one's own mode afterwards.

    Restoring only the top module (``model.train(was_training)``) would flip submodules that the
    user deliberately keeps in eval mode, such as a frozen ``BatchNorm1d``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with evaluating(net):
        ...     net.training
        False
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(data: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) batch to ``device``: Lightning's ``move_data_to_device``."""
    return move_data_to_device(data, device)
