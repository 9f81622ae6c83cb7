"""Reading batches: where the model input, the target and the padding mask are in a batch, and
how the model is called with it.

The rules cover ``(input, target, ...)`` tuples, dicts with ``x``/``input``/``image`` and
``y``/``target``/``label`` keys, and Hugging Face-style dicts (``input_ids``...); every function
that reads batches takes a user's ``input_fn``/``mask_fn`` in their place.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_neuronprune.errors import StatisticsError

__all__ = [
    "HF_INPUT_KEYS",
    "INPUT_KEYS",
    "MASK_KEY",
    "TARGET_KEYS",
    "batch_input",
    "batch_mask",
    "batch_size",
    "call_model",
    "truncate",
]

#: Keys tried, in order, to find the model input in a ``dict`` batch.
INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "image", "images", "features", "data")

#: Keys that mark a Hugging Face-style dict batch, whose model input is the whole dict (less
#: the :data:`TARGET_KEYS`).
HF_INPUT_KEYS: tuple[str, ...] = ("input_ids", "inputs_embeds", "pixel_values", "input_values")

#: Keys of the metric's target in a ``dict`` batch, in the order they are tried.
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels")

#: The key of the padding mask in a ``dict`` batch (1 = real token, 0 = padding).
MASK_KEY = "attention_mask"


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


def batch_size(x: Any) -> int:
    """The number of samples of a model input (a tensor, a sequence or a mapping of tensors)."""
    if isinstance(x, Tensor):
        return x.shape[0]
    if isinstance(x, (tuple, list)) and x:
        return batch_size(x[0])
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return v.shape[0]
    raise StatisticsError(f"cannot take the batch size of an input of type {type(x).__name__}")


def truncate(x: Any, n: int) -> Any:
    """The first ``n`` samples of a model input (every tensor cut along its first axis)."""
    if isinstance(x, Tensor):
        return x[:n]
    if isinstance(x, (tuple, list)):
        return type(x)(truncate(v, n) for v in x)
    if isinstance(x, Mapping):
        return {k: truncate(v, n) for k, v in x.items()}
    return x
