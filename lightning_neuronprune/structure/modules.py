"""The layer types a reduced network is built from, and how they are put in place.

:class:`GatheredLinear` keeps a subset of its input features before the matrix product (where the
eliminated features have no producer rows to delete); :func:`linear_from` builds an ``nn.Linear``
(or a :class:`GatheredLinear`) around given tensors without random initialisation;
:func:`replace_module` swaps a module into a model by its qualified name;
:func:`sliced_batchnorm` keeps some channels of a batch norm (1-d or 2-d).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatheredLinear", "linear_from", "replace_module", "sliced_batchnorm"]


class GatheredLinear(nn.Linear):
    """An ``nn.Linear`` that first keeps the input features ``index``: ``y = W x[..., index] + b``.

    Used where the eliminated features have no producer rows to delete (network input, flattened
    conv output). ``in_features`` is ``len(index)``; the buffer ``index`` is saved in the
    ``state_dict``.

    Args:
        index: (p,) LongTensor of the kept input features.
        out_features: m.
        bias: whether the layer has a bias.
        source_features: n, the width of the input before gathering.
    """

    def __init__(
        self,
        index: Tensor,
        out_features: int,
        bias: bool = True,
        source_features: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(int(index.numel()), out_features, bias=bias, device=device, dtype=dtype)
        self.source_features = int(source_features or int(index.max()) + 1)
        self.register_buffer("index", index.detach().to(device=device, dtype=torch.long).clone())

    def forward(self, x: Tensor) -> Tensor:
        # Gather on a 2-D view: index_select on the last dim of a 3-D (batch × tokens × n)
        # tensor takes a slow path on CPU (about 15x slower for the same elements).
        rows = x.reshape(-1, x.shape[-1]).index_select(1, self.index)
        return F.linear(rows, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, source_features={self.source_features}"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` under the qualified ``name`` of ``model`` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def linear_from(
    weight: Tensor,
    bias: Tensor | None,
    *,
    index: Tensor | None = None,
    source_features: int | None = None,
    like: nn.Module | None = None,
) -> nn.Linear:
    """An ``nn.Linear`` (a :class:`GatheredLinear` with ``index``) holding the given tensors.

    The module is built on the meta device, so no random initialisation runs and no memory is
    allocated for weights that are about to be replaced; then ``weight`` and ``bias`` become its
    parameters as they are (same device and dtype, no copy).

    Args:
        weight: (m × p) weight.
        bias: (m,) bias, or ``None``.
        index: (p,) kept input features of a :class:`GatheredLinear`.
        source_features: n, the input width before gathering (with ``index``).
        like: copy ``requires_grad`` and the train/eval mode from this module.

    Example:
        >>> layer = linear_from(torch.ones(3, 2), torch.zeros(3))
        >>> layer(torch.ones(1, 2)).tolist()
        [[2.0, 2.0, 2.0]]
    """
    m, p = weight.shape
    with torch.device("meta"):
        if index is None:
            new: nn.Linear = nn.Linear(p, m, bias=bias is not None)
        else:
            if source_features is None:
                raise ValueError("`source_features` is required with `index`")
            new = GatheredLinear(
                torch.zeros(p, dtype=torch.long), m, bias=bias is not None,
                source_features=source_features,
            )  # fmt: skip
    grad = next(like.parameters()).requires_grad if like is not None else True
    new.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=grad)
    if index is not None:
        new.index = index.detach().to(device=weight.device, dtype=torch.long)
    if like is not None:
        new.train(like.training)
    return new


def sliced_batchnorm(bn: nn.Module, kept: Tensor) -> nn.Module:
    """A batch norm of ``bn``'s type with only the channels ``kept`` (running statistics,
    affine parameters and ``num_batches_tracked`` copied)."""
    ref = bn.weight if bn.affine else bn.running_mean
    with torch.device("meta"):
        new = type(bn)(
            int(kept.numel()),
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
        )
    new = new.to_empty(device=ref.device if ref is not None else "cpu")
    if ref is not None:
        new = new.to(dtype=ref.dtype)
    new.train(bn.training)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, attr)
            if src is not None:
                getattr(new, attr).copy_(src[kept.to(src.device)])
                getattr(new, attr).requires_grad_(src.requires_grad)
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new
