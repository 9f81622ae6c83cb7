"""Streaming second-moment statistics of a layer's input, gathered through forward pre-hooks.

Everything the method needs from the activation matrix ``X`` (n features × K samples) is

* the Gram matrix ``G = X Xᵀ = Σ_k x_k x_kᵀ`` (n × n),
* the feature sums ``s = X 1 = Σ_k x_k`` (n,),
* the sample count ``K``.

These are accumulated in float64 on the model's device, batch after batch, so memory is O(n²)
whatever K is. The n × K matrix is never stored. Under ``torch.distributed`` the sums are
all-reduced so that every rank holds the same numbers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.runtime import evaluating, model_device, to_device
from lightning_neuronprune.errors import StatisticsError

__all__ = [
    "JunctionStatistics",
    "batch_input",
    "batch_mask",
    "call_model",
    "channel_rows",
    "collect_statistics",
    "first_input",
]

log = logging.getLogger(__name__)

#: Keys tried, in order, to find the model input in a ``dict`` batch.
INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "image", "images", "features", "data")

#: Keys that mark a Hugging Face-style dict batch, whose model input is the whole dict (less
#: the :data:`TARGET_KEYS`).
HF_INPUT_KEYS: tuple[str, ...] = ("input_ids", "inputs_embeds", "pixel_values", "input_values")

#: Keys of the metric's target in a ``dict`` batch, in the order they are tried.
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels")

#: The key of the padding mask in a ``dict`` batch (1 = real token, 0 = padding).
MASK_KEY = "attention_mask"


@dataclass
class JunctionStatistics:
    """Second moments of the n features that a consumer ``nn.Linear`` reads.

    Attributes:
        gram: ``G = Σ_k x_k x_kᵀ``, shape (n, n), float64.
        total: ``s = Σ_k x_k``, shape (n,), float64.
        count: the number of samples K (rows seen by the consumer).
    """

    gram: Tensor
    total: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device | str | None = None) -> JunctionStatistics:
        """Empty statistics for ``n`` features, accumulated in float64 on ``device``."""
        return cls(
            gram=torch.zeros(n, n, dtype=torch.float64, device=device),
            total=torch.zeros(n, dtype=torch.float64, device=device),
            count=0,
        )

    @classmethod
    def from_activations(cls, X: Tensor) -> JunctionStatistics:
        """Statistics of a K × n batch of activations (rows are samples)."""
        stats = cls.zeros(X.shape[-1], X.device)
        stats.update(X)
        return stats

    @property
    def num_features(self) -> int:
        """n, the number of features."""
        return self.gram.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gram.device

    def update(self, x: Tensor) -> None:
        """Add a batch of activations ``x`` of shape (K_b, n): ``G += xᵀx``, ``s += xᵀ1``."""
        x = x.detach().reshape(-1, self.num_features).to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.total.add_(x.sum(0))
        self.count += x.shape[0]

    def mean(self) -> Tensor:
        """The feature means ``μ = s / K``, shape (n,)."""
        self._check_nonempty()
        return self.total / self.count

    def second_moment(self, centered: bool = False) -> Tensor:
        """``G / K`` or, if ``centered``, the covariance ``G / K - μ μᵀ``; shape (n, n), float64."""
        self._check_nonempty()
        M = self.gram / self.count
        if centered:
            mu = self.mean()
            M = M - torch.outer(mu, mu)
        return (M + M.T) / 2

    def to(self, device: torch.device | str) -> JunctionStatistics:
        """A copy on ``device``."""
        return JunctionStatistics(self.gram.to(device), self.total.to(device), self.count)

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics over the ranks of ``group`` in place (no-op without a group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        for t in (self.gram, self.total, count):
            torch.distributed.all_reduce(t, group=group)
        self.count = int(count.item())

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise StatisticsError(
                f"no samples were recorded for these {self.num_features}-feature statistics; "
                "the data iterable was empty or `max_samples` was 0"
            )


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


def batch_input(batch: Any) -> Any:
    """Find the model input in a batch.

    The rule: a tensor is the input itself; for a tuple or list, the input is its first element;
    for a mapping, the first of the keys ``x, input, inputs, image, images, features, data`` that
    is present. A Hugging Face-style mapping (with ``input_ids``, ``inputs_embeds``,
    ``pixel_values`` or ``input_values``) is the input as a whole, less its target keys
    (``labels``...), so that the model gets ``input_ids``, ``attention_mask``, ``token_type_ids``
    and so on (see :func:`call_model` for how a mapping is passed). Pass ``input_fn`` to
    :func:`collect_statistics` for anything else.

    Example:
        >>> sorted(batch_input({"input_ids": 1, "attention_mask": 1, "labels": 0}))
        ['attention_mask', 'input_ids']

    Raises:
        StatisticsError: if no input can be found.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        if any(key in batch for key in HF_INPUT_KEYS):
            return {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        raise StatisticsError(
            f"cannot find the model input in a dict batch with keys {sorted(batch)}; expected one "
            f"of {list(INPUT_KEYS)} or a Hugging Face-style {list(HF_INPUT_KEYS)}, or pass "
            "`input_fn`"
        )
    raise StatisticsError(
        f"cannot find the model input in a batch of type {type(batch).__name__}; pass `input_fn`"
    )


def batch_mask(batch: Any) -> Tensor | None:
    """The padding mask of a batch: ``batch["attention_mask"]`` of a mapping, else ``None``.

    The mask has the leading shape of the activations, (B, T) for (B, T, n) token activations;
    non-zero entries are real tokens. Pass ``mask_fn`` to :func:`collect_statistics` for another
    rule, or ``mask_fn=lambda batch: None`` to count every token.
    """
    if isinstance(batch, Mapping):
        mask = batch.get(MASK_KEY)
        return mask if isinstance(mask, Tensor) else None
    return None


def _takes_keywords(module: nn.Module, keys: Iterable[Any]) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    names = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    return all(isinstance(k, str) and k in names for k in keys)


def call_model(model: nn.Module, x: Any) -> Any:
    """Run ``model`` on an input found by :func:`batch_input` (or a user's ``input_fn``).

    A mapping is passed as keyword arguments (``model(**x)``) when ``model.forward`` takes all of
    its keys (or ``**kwargs``), as a Hugging Face model does; otherwise, as any other input, it is
    passed whole (``model(x)``), as to a LightningModule whose ``forward`` takes the batch.
    """
    if isinstance(x, Mapping) and _takes_keywords(model, x.keys()):
        return model(**x)
    return model(x)


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.shape[0]
    if isinstance(x, (tuple, list)) and x:
        return _batch_size(x[0])
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return v.shape[0]
    raise StatisticsError(f"cannot take the batch size of an input of type {type(x).__name__}")


def _truncate(x: Any, n: int) -> Any:
    if isinstance(x, Tensor):
        return x[:n]
    if isinstance(x, (tuple, list)):
        return type(x)(_truncate(v, n) for v in x)
    if isinstance(x, Mapping):
        return {k: _truncate(v, n) for k, v in x.items()}
    return x


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
    if _batch_size(x) > size:
        x = _truncate(x, size)
    return to_device(x, device)


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
                f"`nn.Linear` (not a gathering one) whose {width} input features are a "
                "multiple of its channels"
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

    Returns:
        ``{consumer name: JunctionStatistics}``.

    Raises:
        StatisticsError: a consumer is not an ``nn.Linear`` or a conv, ``channels`` does not
            divide its input features, no sample was seen, or an
            activation is NaN or infinite (the message names the layer).
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

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            shape = tuple(x.shape)
            if name in widths:  # channels: every position a sample, no mask
                stats[name].update(channel_rows(x, widths[name]).to(device))
                shapes[name] = shape
                return
            rows = x.reshape(-1, shape[-1])  # (K_b, n_in): 2-D ops are fast for any leading shape
            index = getattr(module, "index", None)  # a GatheredLinear reads x[..., index]
            if isinstance(index, Tensor):
                rows = rows.index_select(1, index)
            mask = current["mask"]
            if mask is not None and tuple(mask.shape) == shape[:-1]:
                real = mask.to(rows.device).reshape(-1).nonzero().squeeze(1)
                rows = rows.index_select(0, real)  # (real tokens, n)
            stats[name].update(rows.to(device))
            shapes[name] = shape

        return hook

    get_input = input_fn if input_fn is not None else batch_input
    get_mask = mask_fn if mask_fn is not None else batch_mask
    current: dict[str, Tensor | None] = {"mask": None}
    shapes: dict[str, tuple[int, ...]] = {}
    prepare = transfer if transfer is not None else (lambda b: b)
    context = forward_context if forward_context is not None else nullcontext
    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in stats]
    seen = 0
    try:
        with evaluating(model):
            for batch in data:
                if max_samples is not None and seen >= max_samples:
                    break
                batch = prepare(batch)
                x = to_device(get_input(batch), device)
                mask = get_mask(batch)
                if max_samples is not None and _batch_size(x) > max_samples - seen:
                    x = _truncate(x, max_samples - seen)
                    mask = _truncate(mask, max_samples - seen)
                current["mask"] = mask
                with context():
                    call_model(model, x)
                seen += _batch_size(x)
                log.debug("statistics: %d samples", seen)
                if progress is not None:
                    progress(seen)
    finally:
        for h in handles:
            h.remove()

    if sync:
        for s in stats.values():
            s.all_reduce()
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
