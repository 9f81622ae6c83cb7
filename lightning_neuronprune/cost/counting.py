"""Counting the operations and storage of one inference, layer by layer.

:func:`count_inference` runs a model once with forward hooks and returns, for each counted layer,
its :class:`LayerCount` per inference: multiply-accumulates ``M``, weights ``N_w`` and stored
activations (the layer's input elements), plus the elements of the model's output.
:mod:`lightning_neuronprune.cost.energy` prices these counts in joules and bits
(:class:`~lightning_neuronprune.cost.energy.EnergyModel`, whose ``rules`` extend the built-in ones).

Counting rules (per inference):

* ``nn.Linear``: ``M = in_features · out_features`` per row, ``N_w = in_features · out_features``
  (a ``Linear`` subclass that gathers its input features is charged for the gathered ones);
* ``nn.Conv2d``: ``M = H_out · W_out · C_out · k_h · k_w · C_in / groups`` (``Conv1d`` and
  ``Conv3d`` likewise), ``N_w`` = elements of ``weight``;
* ``nn.Embedding`` (transformers): no MACs, ``N_w`` = the table; ``nn.LayerNorm``,
  ``nn.RMSNorm`` and the RMS norms of Hugging Face decoders (classes named ``*RMSNorm``): one MAC
  per element, ``N_w`` = elements of its scale. Attention's matrix products have no module and
  are not counted;
* ``N_a`` = elements of the input of every counted layer, plus the elements of the model's output;
* BatchNorm, pooling, activations, dropout, flatten, LRN and any module whose class or instance sets
  ``_neuronprune_cost_free = True`` cost nothing. BatchNorm is free because the paper folds it into
  the neighbouring layer;
* any other module that owns parameters raises
  :class:`~lightning_neuronprune.errors.UnsupportedLayerError` unless a rule is registered for its
  type (:meth:`EnergyModel.with_rule <lightning_neuronprune.cost.energy.EnergyModel.with_rule>`).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_neuronprune.core.batches import call_model
from lightning_neuronprune.core.runtime import evaluating
from lightning_neuronprune.errors import NeuronEliminationError, UnsupportedLayerError

__all__ = [
    "CountingRule",
    "LayerCount",
    "count_conv",
    "count_embedding",
    "count_inference",
    "count_layernorm",
    "count_linear",
    "count_nothing",
]

_COST_FREE_ATTRIBUTE = "_neuronprune_cost_free"


@dataclass(frozen=True)
class LayerCount:
    """Operation and storage counts of one layer.

    In :attr:`EnergyReport.per_layer <lightning_neuronprune.cost.energy.EnergyReport.per_layer>` the
    counts are per inference. A :data:`CountingRule` returns them for the whole forward call it
    observes (all samples of the batch); :func:`count_inference` then divides ``macs`` and
    ``activations`` by the batch size. ``weights`` is a property of the layer, not of the call, and
    is never divided.

    Args:
        macs: Multiply-accumulate operations.
        weights: Stored weight elements (biases excluded).
        activations: Stored activation elements (the layer's input elements).

    Raises:
        TypeError: If a count is not an integer.
        ValueError: If a count is negative.
    """

    macs: int = 0
    weights: int = 0
    activations: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"`{f.name}` must be an integer, got {value!r}")
            value = operator.index(value)
            if value < 0:
                raise ValueError(f"`{f.name}` must be non-negative, got {value}")
            object.__setattr__(self, f.name, value)


CountingRule = Callable[[nn.Module, Any, Any], LayerCount]
"""``rule(module, input, output) -> LayerCount``.

``input`` is the first positional input of the module's forward call (or the first keyword
argument when there is no positional one) and ``output`` is what the call returned; both still
carry the batch dimension. The rule returns the counts of the whole call (see
:class:`LayerCount`). A module matched by a rule is counted as a unit: its submodules are not
visited.
"""


def count_linear(module: nn.Module, input: Tensor, output: Any) -> LayerCount:
    """Count an ``nn.Linear`` call on an input of shape ``(*, n)``.

    With weight ``(out_features, in_features)`` and ``R = input.numel() / n`` rows:
    ``M = R · in_features · out_features``, ``N_w = weight.numel()`` and
    ``N_a = R · in_features``. For a plain ``nn.Linear`` ``n = in_features``; a subclass that
    gathers ``in_features`` of its ``n`` input features before the product (such as
    :class:`~lightning_neuronprune.structure.modules.GatheredLinear`) is charged for the gathered
    features
    only.

    Args:
        module: An ``nn.Linear`` (or a module with a 2-d ``weight`` of shape ``(out, in)``).
        input: The layer's input, shape ``(*, n)``.
        output: The layer's output (unused).

    Returns:
        The counts of the call.
    """
    weight: Tensor = module.weight
    out_features, in_features = weight.shape
    rows = input.numel() // input.shape[-1] if input.dim() else 1
    return LayerCount(
        macs=rows * in_features * out_features,
        weights=weight.numel(),
        activations=rows * in_features,
    )


def count_conv(module: nn.Module, input: Tensor, output: Tensor) -> LayerCount:
    """Count an ``nn.Conv1d``/``Conv2d``/``Conv3d`` call.

    For a 2-d convolution with output ``(B, C_out, H_out, W_out)`` and weight
    ``(C_out, C_in / groups, k_h, k_w)``:
    ``M = B · H_out · W_out · C_out · k_h · k_w · C_in / groups``, that is
    ``output.numel() · weight[0].numel()``. ``N_w = weight.numel()`` and ``N_a = input.numel()``
    (before padding).

    Args:
        module: A convolution with a ``weight`` of shape ``(C_out, C_in / groups, *kernel)``.
        input: The layer's input, shape ``(B, C_in, *spatial)``.
        output: The layer's output, shape ``(B, C_out, *spatial_out)``.

    Returns:
        The counts of the call.
    """
    weight: Tensor = module.weight
    macs_per_output = weight[0].numel()  # (C_in / groups) · prod(kernel)
    return LayerCount(
        macs=output.numel() * macs_per_output,
        weights=weight.numel(),
        activations=input.numel(),
    )


def count_nothing(module: nn.Module, input: Any, output: Any) -> LayerCount:
    """Count nothing: a rule that declares a layer type free (the layer stays in ``per_layer``).

    Args:
        module: Any module.
        input: Ignored.
        output: Ignored.

    Returns:
        ``LayerCount(0, 0, 0)``.
    """
    return LayerCount()


def count_embedding(module: nn.Module, input: Tensor, output: Tensor) -> LayerCount:
    """Count an ``nn.Embedding`` call: a table look-up, no MACs; ``N_w = weight.numel()`` (the
    table is stored and read like any weight); its integer input is not an activation."""
    return LayerCount(macs=0, weights=module.weight.numel(), activations=0)


def count_layernorm(module: nn.Module, input: Tensor, output: Tensor) -> LayerCount:
    """Count an ``nn.LayerNorm`` call: one multiply-add per element for the scale and shift
    (``M = input.numel()`` when affine), ``N_w`` = elements of ``weight`` (biases are not
    counted), and its input as activations."""
    weight = getattr(module, "weight", None)
    return LayerCount(
        macs=input.numel() if weight is not None else 0,
        weights=weight.numel() if weight is not None else 0,
        activations=input.numel(),
    )


def _builtin_rules() -> dict[type[nn.Module], CountingRule]:
    return {
        nn.Linear: count_linear,
        nn.Conv1d: count_conv,
        nn.Conv2d: count_conv,
        nn.Conv3d: count_conv,
        nn.Embedding: count_embedding,
        nn.LayerNorm: count_layernorm,
        nn.RMSNorm: count_layernorm,
    }


def count_inference(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any],
    rules: Mapping[type[nn.Module], CountingRule] | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, LayerCount], int]:
    """Run ``model`` once on ``example_input`` and count one inference, layer by layer.

    The model runs under ``torch.no_grad()`` in eval mode; hooks are removed and every module's
    train/eval mode is restored afterwards, also on error. The MACs and activations of the call
    are divided by the batch size. Layers that the call does not reach are not counted.

    Args:
        model: The network, on the device of ``example_input``.
        example_input: A batched input, a tuple/list of positional inputs, or a mapping (a
            Hugging Face-style input, passed as keywords when ``forward`` takes its keys; see
            :func:`~lightning_neuronprune.core.batches.call_model`).
        rules: Counting rules added to (and overriding) the built-in ones, ``{module type: rule}``.
        batch_size: Samples in ``example_input`` (default: the first dimension of its first
            tensor).

    Returns:
        ``(per_layer, output_activations)``: the counts of each counted layer, keyed by qualified
        module name, and the elements of the model's output, per inference.

    Raises:
        UnsupportedLayerError, NeuronEliminationError, ValueError: as
            :meth:`EnergyModel.estimate <lightning_neuronprune.cost.energy.EnergyModel.estimate>`.
    """
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    batch = _infer_batch_size(args) if batch_size is None else batch_size
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch!r}")

    counted, unsupported = _plan(model, {**_builtin_rules(), **(rules or {})})
    calls: dict[str, LayerCount] = {}
    reached_unsupported: dict[str, nn.Module] = {}
    handles: list[RemovableHandle] = []
    try:
        for name, module, rule in counted:
            handles.append(
                module.register_forward_hook(
                    _make_counting_hook(name, rule, calls), with_kwargs=True
                )
            )
        for name, module in unsupported:
            handles.append(
                module.register_forward_hook(
                    _make_flagging_hook(name, reached_unsupported), with_kwargs=True
                )
            )
        with evaluating(model), torch.no_grad():
            # a mapping is a Hugging Face-style input: model(**x) when forward takes its keys
            output = (
                call_model(model, args[0]) if isinstance(example_input, Mapping) else model(*args)
            )
    finally:
        for handle in handles:
            handle.remove()

    if reached_unsupported:
        listing = ", ".join(
            f"{name!r} ({type(module).__name__})" for name, module in reached_unsupported.items()
        )
        raise UnsupportedLayerError(
            f"no energy counting rule for {listing}: these modules own parameters and are not "
            "Linear/Conv/BatchNorm; register a rule with `EnergyModel.with_rule(type, rule)` "
            "or mark the module with `_neuronprune_cost_free = True`"
        )

    per_layer = {
        name: LayerCount(
            macs=_per_inference(count.macs, batch, "MACs", name),
            weights=count.weights,
            activations=_per_inference(count.activations, batch, "activations", name),
        )
        for name, count in calls.items()
    }
    output_activations = _per_inference(_numel(output), batch, "output elements", "<output>")
    return per_layer, output_activations


def _is_cost_free(module: nn.Module) -> bool:
    return getattr(module, _COST_FREE_ATTRIBUTE, False) is True


def _is_folded(module: nn.Module) -> bool:
    # BatchNorm is folded into the neighbouring layer (as in the paper), so it costs nothing.
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


def _lookup(
    module: nn.Module, table: Mapping[type[nn.Module], CountingRule]
) -> CountingRule | None:
    for cls in type(module).__mro__:
        rule = table.get(cls)
        if rule is not None:
            return rule
    if type(module).__name__.endswith("RMSNorm"):  # LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm...
        return table.get(nn.RMSNorm)
    return None


def _plan(
    model: nn.Module, table: Mapping[type[nn.Module], CountingRule]
) -> tuple[list[tuple[str, nn.Module, CountingRule]], list[tuple[str, nn.Module]]]:
    """Split the module tree into counted modules and parametrised modules without a rule.

    A module matched by a rule, marked cost free or folded (BatchNorm) is a unit: its submodules are
    not visited; free and folded modules are not listed. Each module is visited once, under its
    first name, even if it appears several times in the tree.
    """
    counted: list[tuple[str, nn.Module, CountingRule]] = []
    unsupported: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if _is_cost_free(module):
            return
        rule = _lookup(module, table)
        if rule is not None:
            counted.append((name, module, rule))
            return
        if _is_folded(module):
            return
        if next(module.parameters(recurse=False), None) is not None:
            unsupported.append((name, module))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return counted, unsupported


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _make_counting_hook(
    name: str, rule: CountingRule, calls: dict[str, LayerCount]
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        count = rule(module, _first_input(args, kwargs), output)
        if not isinstance(count, LayerCount):
            raise NeuronEliminationError(
                f"the counting rule for layer {name!r} ({type(module).__name__}) returned "
                f"{type(count).__name__}, expected LayerCount"
            )
        previous = calls.get(name)
        if previous is not None:  # a module called several times stores its weights once
            count = LayerCount(
                macs=previous.macs + count.macs,
                weights=max(previous.weights, count.weights),
                activations=previous.activations + count.activations,
            )
        calls[name] = count

    return hook


def _make_flagging_hook(
    name: str, reached: dict[str, nn.Module]
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        reached[name] = module

    return hook


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, Mapping):
        return _first_tensor(list(value.values()))
    return None


def _infer_batch_size(args: tuple[Any, ...]) -> int:
    x = _first_tensor(args)
    if x is None or x.dim() == 0:
        raise ValueError(
            "cannot infer the batch size: `example_input` holds no tensor with a batch dimension; "
            "pass `batch_size`"
        )
    return x.shape[0]


def _numel(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(item) for item in value)
    if isinstance(value, Mapping):
        return sum(_numel(item) for item in value.values())
    return 0


def _per_inference(total: int, batch: int, what: str, name: str) -> int:
    quotient, remainder = divmod(total, batch)
    if remainder:
        raise NeuronEliminationError(
            f"{total} {what} of {name!r} over a batch of {batch} is not a whole number per "
            "inference; check `batch_size`"
        )
    return quotient
