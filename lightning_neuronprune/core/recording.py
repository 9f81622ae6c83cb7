"""Recording statistics from a network: forward pre-hooks on the consumers, one loop over the
batches, and the sum over ``torch.distributed`` ranks.

:func:`collect_statistics` streams each consumer's input into a
:class:`~lightning_neuronprune.core.statistics.JunctionStatistics` in float64 on the model's
device; :func:`stream_inputs` is the loop it shares with the cross statistics of the
compensating fits; :func:`all_reduce` makes every rank hold the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.batches import (
    batch_input,
    batch_mask,
    batch_size,
    call_model,
    truncate,
)
from lightning_neuronprune.core.runtime import evaluating, model_device, to_device
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.errors import StatisticsError

__all__ = [
    "CHANNEL_CONSUMERS",
    "all_reduce",
    "channel_rows",
    "collect_statistics",
    "first_input",
    "stream_inputs",
]

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the last tap's hook to end a forward pass early; caught by the batch loop."""


#: Consumers whose input channels are recorded with every position a sample (a conv reads
#: ``(B, n, *spatial)``).
CHANNEL_CONSUMERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


def channel_rows(x: Tensor, n: int) -> Tensor:
    """The samples of n channels: ``(B, n, *spatial)``, or a flattened ``(B, n·P)`` map, as
    ``(B·P, n)`` rows, every position a sample.

    A channels-last input is reshaped without a copy. Example:

        >>> channel_rows(torch.arange(8.0).reshape(1, 2, 4), 2).tolist()
        [[0.0, 4.0], [1.0, 5.0], [2.0, 6.0], [3.0, 7.0]]
        >>> channel_rows(torch.arange(8.0).reshape(1, 8), 2).shape
        torch.Size([4, 2])
    """
    if x.dim() == 2:
        x = x.reshape(x.shape[0], n, -1)
    return x.movedim(1, -1).reshape(-1, n)


def all_reduce(stats: JunctionStatistics, group: Any = None) -> None:
    """Sum ``stats`` over the ranks of ``group`` in place (no-op without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    count = torch.tensor([float(stats.count)], dtype=torch.float64, device=stats.device)
    for t in (stats.gram, stats.total, count):
        torch.distributed.all_reduce(t, group=group)
    stats.count = int(count.item())


def first_input(
    data: Iterable[Any],
    size: int,
    device: torch.device | str,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    transfer: Callable[[Any], Any] | None = None,
) -> Any:
    """The model input of the first batch of ``data``, as the model is fed it (``transfer``, then
    ``input_fn``, default :func:`batch_input`), cut to ``size`` samples and moved to ``device``:
    the example of the energy model and of the junction probe."""
    batch = next(iter(data))
    x = (input_fn or batch_input)(transfer(batch) if transfer is not None else batch)
    if batch_size(x) > size:
        x = truncate(x, size)
    return to_device(x, device)


@torch.no_grad()
def stream_inputs(
    models: Sequence[nn.Module],
    taps: Sequence[tuple[int, str]],
    data: Iterable[Any],
    sink: Callable[[int, Tensor, tuple[int, ...], Tensor | None], None],
    *,
    end_batch: Callable[[], None] | None = None,
    max_samples: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    mask_fn: Callable[[Any], Tensor | None] | None = None,
    device: torch.device | str | None = None,
    transfer: Callable[[Any], Any] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    progress: Callable[[int], None] | None = None,
    channels: Mapping[int, int] | None = None,
    stop_early: bool = False,
) -> int:
    """Run every model on each batch of ``data`` and pass the input rows of tapped modules on.

    The one loop over batches behind :func:`collect_statistics` and
    :func:`~lightning_neuronprune.search.compensation.collect_cross_statistics`. Each batch is
    prepared once (``transfer``, then ``input_fn``, moved to ``device``, cut at ``max_samples``) and
    fed to every model in turn through :func:`~lightning_neuronprune.core.batches.call_model` under
    ``forward_context``. A forward pre-hook on each tap flattens the module's input ``(*, n)`` to
    rows ``(K_b, n)`` (a ``GatheredLinear``'s kept columns only) and zeroes the rows that the
    batch's padding mask (``mask_fn``, default
    :func:`~lightning_neuronprune.core.batches.batch_mask`) marks as padding, where the mask has the
    input's leading shape; then ``sink(tap, rows, shape, padding)`` gets them, ``tap`` being the
    tap's position in ``taps``, ``shape`` the input's shape and ``padding`` the number of zeroed
    rows as a 0-d device tensor (``None`` without a mask), so that a zeroed row adds nothing to
    ``G`` or the sums and the sink can take the padding off ``K`` once, after the loop.
    ``end_batch`` runs after every model has seen the batch. A tap named in ``channels`` (a conv
    consumer, or an ``nn.Linear`` over a flattened ``(n, *spatial)`` map) is passed its n input
    channels instead, every spatial position a row (:func:`channel_rows`), with no mask.

    The models run in ``eval()`` under ``torch.no_grad()``; every module's mode is restored and
    the hooks are removed afterwards, even on error. Nothing here waits for the device.

    Args:
        models: the networks, all fed the same batches.
        taps: ``(model index, module name)`` of each recorded module.
        data: any iterable of batches (see :func:`batch_input`).
        sink: receives ``(tap, rows (K_b, n), input shape, padding rows)`` at each call of a
            tapped module.
        end_batch: called after each batch.
        max_samples, input_fn, mask_fn, device, transfer, forward_context, progress: as in
            :func:`collect_statistics`; ``device`` defaults to the first model's device.
        channels: ``{tap: n}`` for the taps recorded over n channels.
        stop_early: end each forward pass right after the last tap of its model has read its
            input (the model's output is never computed).

    Returns:
        The number of samples fed (per process).

    Raises:
        StatisticsError: ``max_samples`` is not positive.
    """
    if max_samples is not None and max_samples < 1:
        raise StatisticsError(f"`max_samples` must be a positive integer, got {max_samples!r}")
    device = torch.device(device) if device is not None else model_device(models[0])
    current: dict[str, Tensor | None] = {"mask": None}
    widths = dict(channels or {})
    owned = [{i for i, (m, _) in enumerate(taps) if m == k} for k in range(len(models))]
    waiting: list[set[int]] = [set() for _ in models]  # taps still to run in the current pass

    def done(tap: int) -> None:
        left = waiting[taps[tap][0]]
        left.discard(tap)
        if stop_early and not left:
            raise _StopForward

    def make_hook(tap: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            shape = tuple(x.shape)
            if tap in widths:  # channels: every position a sample, no mask
                sink(tap, channel_rows(x, widths[tap]), shape, None)
                done(tap)
                return
            rows = x.reshape(-1, shape[-1])  # (K_b, n_in): 2-D ops are fast for any leading shape
            index = getattr(module, "index", None)  # a GatheredLinear reads x[..., index]
            if isinstance(index, Tensor):
                rows = rows.index_select(1, index)
            mask, padding = current["mask"], None
            if mask is not None and tuple(mask.shape) == shape[:-1]:
                # weight the rows instead of selecting them (no nonzero, no host read): a padding
                # row becomes zero and adds nothing to a sum of products; its count is handed on
                # as a device tensor, for the sink to take off K after the loop
                real = mask.to(rows.device).reshape(-1, 1) != 0  # (K_b, 1)
                rows = torch.where(real, rows, rows.new_zeros(()))  # NaN padding is dropped too
                padding = (~real).sum()
            sink(tap, rows, shape, padding)
            done(tap)

        return hook

    get_input = input_fn if input_fn is not None else batch_input
    get_mask = mask_fn if mask_fn is not None else batch_mask
    prepare = transfer if transfer is not None else (lambda b: b)
    context = forward_context if forward_context is not None else nullcontext
    seen = 0
    with ExitStack() as stack:
        for i, (m, name) in enumerate(taps):
            handle = models[m].get_submodule(name).register_forward_pre_hook(make_hook(i))
            stack.callback(handle.remove)
        for model in models:
            stack.enter_context(evaluating(model))
        for batch in data:
            if max_samples is not None and seen >= max_samples:
                break
            batch = prepare(batch)
            x = to_device(get_input(batch), device)
            mask = get_mask(batch)
            if max_samples is not None and batch_size(x) > max_samples - seen:
                x = truncate(x, max_samples - seen)
                mask = truncate(mask, max_samples - seen)
            current["mask"] = mask
            for k, model in enumerate(models):
                waiting[k] = set(owned[k])
                try:
                    with context():
                        call_model(model, x)
                except _StopForward:
                    pass  # every tap of this model has read its input
            if end_batch is not None:
                end_batch()
            seen += batch_size(x)
            log.debug("statistics: %d samples", seen)
            if progress is not None:
                progress(seen)
    return seen


def _channel_widths(
    modules: Mapping[str, nn.Module], consumers: Sequence[str], channels: Mapping[str, int]
) -> dict[str, int]:
    """n for every consumer whose statistics are over channels (convs, and ``channels``)."""
    widths = {
        name: modules[name].in_channels  # type: ignore[union-attr]
        for name in consumers
        if isinstance(modules.get(name), CHANNEL_CONSUMERS)
    }
    for name, n in channels.items():
        module = modules.get(name)
        width = getattr(module, "in_features", None)
        if (
            name not in consumers
            or not isinstance(module, nn.Linear)
            or hasattr(module, "index")
            or isinstance(n, bool)
            or not isinstance(n, int)
            or n < 1
            or width % n
        ):
            raise StatisticsError(
                f"`channels` gives {name!r} {n!r} channels, but it must name a consumer "
                "`nn.Linear` (not a gathering one) whose "
                f"{width} input features are a multiple of its channels"
            )
        widths[name] = n
    return widths


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    consumers: Sequence[str],
    data: Iterable[Any],
    *,
    max_samples: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    mask_fn: Callable[[Any], Tensor | None] | None = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    transfer: Callable[[Any], Any] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    progress: Callable[[int], None] | None = None,
    channels: Mapping[str, int] | None = None,
    stop_early: bool = False,
) -> dict[str, JunctionStatistics]:
    """Stream the input statistics of the named ``nn.Linear`` (or conv) consumers over ``data``.

    A forward pre-hook on each consumer flattens its input ``(*, n)`` to ``(K_b, n)`` rows and
    adds them to that consumer's :class:`JunctionStatistics`. Token activations (B, T, n) count
    real tokens only: where the batch's padding mask (B, T) (``attention_mask`` by default, see
    :func:`batch_mask`) has the activations' leading shape, only the rows it marks are added, so
    ``K`` counts real tokens and the least-squares fit ignores padding. A consumer whose input
    has another leading shape (after pooling, say) counts every row.

    Conv consumers (``nn.Conv1d``, ``nn.Conv2d``) record their n input channels with every
    spatial position a sample, ``G = Σ_positions x xᵀ`` (see :func:`channel_rows`; channels-last
    inputs too); so does an ``nn.Linear`` named in ``channels``, whose input is a flattened
    ``(n, *spatial)`` conv output. No mask applies to them. The model runs in ``eval()``
    mode under ``torch.no_grad()``; its mode is restored and the hooks are removed afterwards, even
    when an error is raised.

    Args:
        model: the network; it is not modified.
        consumers: qualified names of the ``nn.Linear`` (or ``nn.Conv1d``/``nn.Conv2d``) modules
            whose inputs are recorded.
        data: any iterable of batches (a ``DataLoader``, a list of tensors...). See
            :func:`batch_input` for how the input is found in a batch.
        max_samples: stop after this many samples (per process). The last batch is truncated.
        input_fn: maps a batch to the model input, replacing :func:`batch_input`. The model is
            called through :func:`call_model`.
        mask_fn: maps a batch to its padding mask (non-zero = real token) or ``None``, replacing
            :func:`batch_mask`.
        device: where the model runs and the statistics live; defaults to the model's device.
        sync: all-reduce the statistics over ``torch.distributed`` ranks when a process group is
            initialised, so that every rank holds the same numbers.
        transfer: maps each raw batch to the batch the model runs on, before ``input_fn``; e.g.
            a Trainer's precision ``convert_input`` and strategy ``batch_to_device``, so that
            ``bf16-true`` or ``64-true`` models get inputs of their dtype.
        forward_context: a context-manager factory entered around each forward pass, e.g. the
            precision plugin's ``forward_context`` (autocast under ``*-mixed``). The statistics
            are accumulated in float64 whatever the activations' dtype.
        progress: called after each batch with the number of samples seen so far (e.g. to move
            a progress bar).
        channels: ``{consumer: n}`` for ``nn.Linear`` consumers that read a flattened
            ``(n, *spatial)`` map: their statistics are over the n channels, each position a
            sample.
        stop_early: end each forward pass as soon as the last consumer has read its input
            (the layers after it and the model's output are never computed): the statistics
            are the same, at the cost of the network in front of the consumers only.

    Returns:
        ``{consumer name: JunctionStatistics}``.

    Raises:
        StatisticsError: a consumer is not an ``nn.Linear`` or a conv, ``channels`` does not
            divide its input features, no sample was seen, or an activation is NaN or infinite
            (the message names the layer).
    """
    if max_samples is not None and max_samples < 1:
        raise StatisticsError(f"`max_samples` must be a positive integer, got {max_samples!r}")
    device = torch.device(device) if device is not None else model_device(model)
    modules = dict(model.named_modules())
    stats: dict[str, JunctionStatistics] = {}
    widths = _channel_widths(modules, consumers, channels or {})
    for name in consumers:
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, *CHANNEL_CONSUMERS)):
            raise StatisticsError(
                f"statistics are recorded at the input of an `nn.Linear` or a conv, but {name!r} "
                f"is {type(module).__name__ if module is not None else 'not a module of the model'}"
            )
        n = widths.get(name, getattr(module, "in_features", 0))
        stats[name] = JunctionStatistics.zeros(n, device)
    names = list(stats)
    shapes: dict[str, tuple[int, ...]] = {}

    padding: dict[str, Tensor] = {}  # zeroed padding rows per consumer, on the device

    def record(tap: int, rows: Tensor, shape: tuple[int, ...], pad: Tensor | None) -> None:
        stats[names[tap]].update(rows.to(device))
        shapes[names[tap]] = shape
        if pad is not None:
            padding[names[tap]] = padding.get(names[tap], 0) + pad

    stream_inputs(
        [model], [(0, name) for name in names], data, record, max_samples=max_samples,
        input_fn=input_fn, mask_fn=mask_fn, device=device, transfer=transfer,
        forward_context=forward_context, progress=progress,
        channels={i: widths[name] for i, name in enumerate(names) if name in widths},
        stop_early=stop_early,
    )  # fmt: skip

    for name, rows in padding.items():  # one read per consumer, after the loop
        stats[name].count -= int(rows)
    if sync:
        for s in stats.values():
            all_reduce(s)
    for name, s in stats.items():
        if s.count == 0:
            raise StatisticsError(f"no samples reached layer {name!r}: the data iterable was empty")
        # A NaN or Inf in any batch makes the float64 feature sums non-finite: checked once, at
        # the end, so that the loop over batches never waits for the device.
        if not torch.isfinite(s.total).all():
            raise StatisticsError(
                f"non-finite activations (NaN or Inf) at the input of layer {name!r} "
                f"(last batch shape {shapes.get(name)})"
            )
    return stats
