"""The fitter of a junction, of any kind, as the model holds it.

:func:`junction_fitter` gives a conv junction a
:class:`~lightning_neuronprune.core.conv.ChannelFitter` of its consumer (no intercept where the
consumer pads with zeros; the output-aware selection weighs the consumer's output channels by the
``γ / σ`` of a batch norm that follows it, since that is the output the network uses) and any
other junction a :class:`~lightning_neuronprune.core.fitting.JunctionFitter`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.conv import ChannelFitter
from lightning_neuronprune.core.fitting import FitOptions, JunctionFitter
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.conv import pads_with_zeros
from lightning_neuronprune.structure.conv_tracing import output_batchnorm
from lightning_neuronprune.structure.junction import Junction

__all__ = ["batchnorm_scale", "channel_fitter", "junction_fitter"]


def batchnorm_scale(bn: nn.Module) -> Tensor | None:
    """``γ / sqrt(running_var + eps)`` of a batch norm in eval mode (``1 / σ`` without ``γ``), or
    ``None`` without running statistics."""
    if bn.running_var is None:
        return None
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    return scale * bn.weight.detach().double() if bn.affine else scale


def channel_fitter(
    model: nn.Module,
    junction: Junction,
    stats: JunctionStatistics,
    options: FitOptions | None = None,
) -> ChannelFitter:
    """The :class:`~lightning_neuronprune.core.conv.ChannelFitter` of a conv junction's consumer.

    Raises:
        JunctionError: ``affine`` where the consumer pads with zeros (naming the layer).
    """
    consumer = model.get_submodule(junction.consumer)
    scale = None
    if options is not None and options.method == "output":
        bn = output_batchnorm(model, junction.consumer)
        scale = batchnorm_scale(model.get_submodule(bn)) if bn is not None else None
    try:
        return ChannelFitter(
            stats, consumer.weight, consumer.bias, options,
            zero_padding=pads_with_zeros(consumer), output_scale=scale,
        )  # fmt: skip
    except ValueError as err:
        raise JunctionError(f"consumer {junction.consumer!r} of {junction.layer!r}: {err}") from err


def junction_fitter(
    model: nn.Module,
    junction: Junction,
    stats: JunctionStatistics,
    options: FitOptions | None = None,
) -> JunctionFitter:
    """The fitter of any junction: :func:`channel_fitter` for ``kind="conv"``, else a
    :class:`~lightning_neuronprune.core.fitting.JunctionFitter` of the consumer's weight."""
    if junction.kind == "conv":
        return channel_fitter(model, junction, stats, options)
    consumer = model.get_submodule(junction.consumer)
    return JunctionFitter(stats, consumer.weight, consumer.bias, options)
