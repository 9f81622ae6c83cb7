"""Conv junctions: keeping p of a convolution's n output channels.

A conv junction (``kind="conv"``) is ``conv → [BatchNorm] → per-channel maps → consumer``: the
per-channel maps are elementwise activations, pooling and channel dropout, which act on each
channel alone and so commute with keeping some of them; the consumer is a conv, or an
``nn.Linear`` that reads the flattened ``(n, *spatial)`` map (``conv → flatten → Linear``, as
LeNet-5's ``conv2 → fc1``). Keeping the channels S:

* the producer conv keeps the output channels S (rows of its weight and bias), and so does a
  ``BatchNorm1d``/``BatchNorm2d`` between the two;
* the consumer conv keeps input channels S with every kernel tap re-fitted,
  ``W_p[:, s, t] = Σ_j W[:, j, t] T[j, s]`` (:mod:`lightning_neuronprune.core.conv`); a consumer
  ``nn.Linear`` keeps the P = H·W columns of each kept channel, re-fitted the same way.

The statistics are over channels, every spatial position a sample (:func:`statistics_channels`
says which ``nn.Linear`` consumers need ``channels=`` in
:func:`~lightning_neuronprune.core.recording.collect_statistics`). The junctions are found by
:mod:`lightning_neuronprune.structure.conv_tracing` (or
:mod:`lightning_neuronprune.structure.conv_probe`) and fitted by
:mod:`lightning_neuronprune.structure.conv_fit`. New modules are built on the meta device and
take the computed tensors as their parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import linear_from, sliced_batchnorm

__all__ = [
    "CHANNEL_NORMS",
    "CONV_LAYERS",
    "conv_from",
    "full_width_consumer",
    "pads_with_zeros",
    "placeholder_fit",
    "reduced_conv_modules",
    "statistics_channels",
]

#: Convolutions whose channels can be kept (not transposed ones: their weight is (in, out, k)).
CONV_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)

#: Batch norms that a conv junction slices.
CHANNEL_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


def pads_with_zeros(module: nn.Module) -> bool:
    """Whether a conv consumer reads zeros at its borders (``padding_mode="zeros"`` with some
    padding): then the channel fit has no intercept."""
    if not isinstance(module, CONV_LAYERS) or module.padding_mode != "zeros":
        return False
    if isinstance(module.padding, str):
        return module.padding == "same" and any(k > 1 for k in module.kernel_size)
    return any(p > 0 for p in module.padding)


def statistics_channels(model: nn.Module, junctions: Iterable[Junction]) -> dict[str, int]:
    """``{consumer: n}`` for the conv junctions whose consumer is an ``nn.Linear`` over the
    flattened channels: the ``channels`` argument of
    :func:`~lightning_neuronprune.core.recording.collect_statistics`."""
    return {
        j.consumer: j.num_features
        for j in junctions
        if j.kind == "conv" and isinstance(model.get_submodule(j.consumer), nn.Linear)
    }


def _parameter(t: Tensor, like: Tensor) -> nn.Parameter:
    t = t.detach()
    channels_last = (
        t.dim() == 4
        and like.dim() == 4
        and not like.is_contiguous()
        and like.is_contiguous(memory_format=torch.channels_last)
    )
    format = torch.channels_last if channels_last else torch.contiguous_format
    # canonical strides (also on size-1 dims, e.g. of a 1×1 kernel): the conv kernel chosen, and
    # so the round-off, depends on them
    return nn.Parameter(t.clone(memory_format=format), requires_grad=like.requires_grad)


def conv_from(like: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A conv of ``like``'s type and geometry (kernel, stride, padding and its mode, dilation,
    groups) holding ``weight`` (out, in/groups, *kernel) and ``bias``, built on the meta device
    (no initialisation); the weight keeps ``like``'s memory format (channels-last or not)."""
    with torch.device("meta"):
        new = type(like)(
            weight.shape[1] * like.groups,
            weight.shape[0],
            like.kernel_size,
            stride=like.stride,
            padding=like.padding,
            dilation=like.dilation,
            groups=like.groups,
            bias=bias is not None,
            padding_mode=like.padding_mode,
        )
    new.weight = _parameter(weight, like.weight)
    if bias is not None:
        new.bias = _parameter(bias, like.weight)
    new.train(like.training)
    return new


def _consumer_shape(consumer: nn.Module, n: int, p: int) -> tuple[int, ...]:
    W = consumer.weight
    if W.dim() > 2:
        return (W.shape[0], p, *W.shape[2:])
    return (W.shape[0], p * (W.shape[1] // n))


def reduced_conv_modules(
    model: nn.Module, junction: Junction, kept: Tensor, W_p: Tensor, b_p: Tensor | None
) -> dict[str, nn.Module]:
    """The reduced producer, batch norm and consumer of a conv junction, by name; ``model`` is
    not modified.

    Args:
        model: holds the junction.
        junction: a ``kind="conv"`` junction.
        kept: (p,) sorted indices of the kept channels (checked with one host read).
        W_p: the consumer's new weight, (m, p, *kernel) for a conv or (m, p·P) for a Linear.
        b_p: its new bias, (m,), or ``None``.

    Raises:
        JunctionError: ``kept`` or ``W_p`` do not fit the junction (nothing is built).
    """
    n = junction.num_features
    prod = model.get_submodule(junction.producer)  # type: ignore[arg-type]
    cons = model.get_submodule(junction.consumer)
    kept = kept.to(device=prod.weight.device, dtype=torch.long).reshape(-1)
    p = int(kept.numel())
    # one host read: increasing (so distinct) and in range
    if p < 1 or not bool((kept.diff() > 0).all() & (kept[0] >= 0) & (kept[-1] < n)):
        raise JunctionError(
            f"the kept channels of {junction.layer!r} must be increasing indices in [0, {n}), "
            f"got {kept.tolist()}"
        )
    expected = _consumer_shape(cons, n, p)
    if tuple(W_p.shape) != expected:
        raise JunctionError(
            f"the new weight of consumer {junction.consumer!r} must have shape {expected} for "
            f"{p} kept channels, got {tuple(W_p.shape)}"
        )
    bias = prod.bias.detach().index_select(0, kept) if prod.bias is not None else None
    out: dict[str, nn.Module] = {
        junction.producer: conv_from(prod, prod.weight.detach().index_select(0, kept), bias)  # type: ignore[dict-item]
    }
    if junction.batchnorm is not None:
        out[junction.batchnorm] = sliced_batchnorm(model.get_submodule(junction.batchnorm), kept)
    # copies: the caller keeps its tensors, the model gets parameters of its own
    W_p = W_p.to(cons.weight, copy=True)
    b_p = b_p.to(cons.weight, copy=True) if b_p is not None else None
    if isinstance(cons, nn.Linear):
        out[junction.consumer] = linear_from(W_p, b_p, like=cons)
    else:
        out[junction.consumer] = conv_from(cons, W_p, b_p)
    return out


def placeholder_fit(
    model: nn.Module, junction: Junction, kept: Tensor, *, bias: bool | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(W_p, b_p)`` of the reduced shapes, filled from the consumer's first columns: what
    :func:`~lightning_neuronprune.structure.persistence.rebuild_shapes` replays before
    ``load_state_dict`` overwrites it. ``bias`` forces a bias (zeros) on or off."""
    cons = model.get_submodule(junction.consumer)
    shape = _consumer_shape(cons, junction.num_features, int(kept.numel()))
    W_p = cons.weight.detach()[:, : shape[1]].reshape(shape)
    b_p = cons.bias.detach() if cons.bias is not None else None
    if bias and b_p is None:
        b_p = cons.weight.new_zeros(cons.weight.shape[0])
    return W_p, b_p


def full_width_consumer(
    consumer: nn.Module, n: int, kept: Tensor, W_p: Tensor, b_p: Tensor | None
) -> nn.Module:
    """The reduced consumer (``consumer`` gives the type and geometry) as it reads the full
    original input of n channels: its
    weight is ``W_p`` at the kept channels and zero at the others, which gives exactly the
    reduced network's output (what the cached evaluator of a sweep runs). No sync, no copy of
    the model."""
    m, p = W_p.shape[0], kept.numel()
    W = (
        W_p.new_zeros(m, n, *W_p.shape[2:])
        if W_p.dim() > 2
        else W_p.new_zeros(m, n, W_p.shape[1] // p)
    )
    W[:, kept.to(W.device)] = W_p.reshape(m, p, *W.shape[2:])
    if isinstance(consumer, nn.Linear):
        return linear_from(W.reshape(m, -1), b_p, like=consumer)
    return conv_from(consumer, W, b_p)
