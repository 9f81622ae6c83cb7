"""Building the reduced modules and swapping them into a model.

Given a :class:`~lightning_neuronprune.structure.junction.Junction` (found by
:mod:`lightning_neuronprune.structure.discovery` or :mod:`lightning_neuronprune.structure.probe`),
the kept features
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

import torch
from torch import Tensor, nn

from lightning_neuronprune.structure.conv import reduced_conv_modules
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import GatheredLinear, linear_from, replace_module

__all__ = ["apply_reduction"]


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
    if junction.kind == "conv":  # W_p: (m, p, *kernel), or (m, p·P) for a Linear consumer
        convs = reduced_conv_modules(model, junction, kept, W_p, b_p)
        for name, module in convs.items():
            replace_module(model, name, module)
        return list(convs)
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
        replace_module(model, name, module)
    return list(replaced)
