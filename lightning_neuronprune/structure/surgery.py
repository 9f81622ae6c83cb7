"""Building the reduced modules and swapping them into a model.

Given a :class:`~lightning_neuronprune.structure.discovery.Junction` (found by
:mod:`lightning_neuronprune.structure.discovery` or :mod:`lightning_neuronprune.structure.probe`), the kept features
and the re-fitted consumer weight ``W_p`` (m × p), :func:`apply_reduction` swaps in:

* the producer with only the kept rows of its weight and bias (``kind="producer"``), and a
  ``BatchNorm1d`` between the two with only the kept features;
* the consumer with the new weight; where there is no producer row to delete (``kind="gather"``:
  the consumer reads the network input or a flattened conv output), a :class:`GatheredLinear`
  that selects the kept input features itself.

New layers are built without random initialisation (:func:`linear_from`) and take the computed
tensors as their parameters. Replaying a saved plan on a fresh model is
:func:`~lightning_neuronprune.structure.persistence.rebuild_shapes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_neuronprune.structure.discovery import Junction

__all__ = ["GatheredLinear", "apply_reduction", "linear_from"]


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


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
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


def _reduced_producer(prod: nn.Linear, kept: Tensor) -> nn.Linear:
    idx = kept.to(prod.weight.device)
    bias = prod.bias.detach().index_select(0, idx) if prod.bias is not None else None
    weight = prod.weight.detach().index_select(0, idx)
    if isinstance(prod, GatheredLinear):
        return linear_from(
            weight, bias, index=prod.index, source_features=prod.source_features, like=prod
        )
    return linear_from(weight, bias, like=prod)


def _reduced_batchnorm(bn: nn.BatchNorm1d, kept: Tensor) -> nn.BatchNorm1d:
    ref = bn.weight if bn.affine else bn.running_mean
    with torch.device("meta"):
        new = nn.BatchNorm1d(
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


def _reduced_consumer(
    cons: nn.Linear, junction: Junction, kept: Tensor, W_p: Tensor, b_p: Tensor | None
) -> nn.Linear:
    # copies: the caller keeps its tensors, the model gets parameters of its own
    W_p = W_p.to(cons.weight, copy=True)
    b_p = b_p.to(cons.weight, copy=True) if b_p is not None else None
    if junction.kind == "gather":
        index = kept.to(cons.weight.device)
        source = cons.in_features
        if isinstance(cons, GatheredLinear):
            index, source = cons.index[index], cons.source_features
        return linear_from(W_p, b_p, index=index, source_features=source, like=cons)
    return linear_from(W_p, b_p, like=cons)


def apply_reduction(
    model: nn.Module, junction: Junction, kept: Tensor, W_p: Tensor, b_p: Tensor | None
) -> list[str]:
    """Swap the reduced producer, batch norm and consumer into ``model``, in place.

    Args:
        model: the network that holds the junction.
        junction: from :func:`find_junction`.
        kept: (p,) sorted indices of the kept features.
        W_p: (m × p) new consumer weight.
        b_p: (m,) new consumer bias, or ``None``.

    Returns:
        The names of the replaced modules.
    """
    replaced: dict[str, nn.Module] = {}
    if junction.producer is not None:
        replaced[junction.producer] = _reduced_producer(
            model.get_submodule(junction.producer), kept
        )
    if junction.batchnorm is not None:
        replaced[junction.batchnorm] = _reduced_batchnorm(
            model.get_submodule(junction.batchnorm), kept
        )
    replaced[junction.consumer] = _reduced_consumer(
        model.get_submodule(junction.consumer), junction, kept, W_p, b_p
    )
    for name, module in replaced.items():
        _set(model, name, module)
    return list(replaced)
