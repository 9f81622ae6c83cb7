"""Energy and memory model of one inference (32-bit floats, 45 nm), after Zhang, Davoodi & Hu.

The model charges, per inference (one sample):

* every multiply-accumulate ``mac`` joules (4.6 pJ = 3.7 pJ multiply + 0.9 pJ add);
* every weight one DRAM read (``dram_access``, 640 pJ) and one SRAM read (``sram_access``, 5 pJ);
* every stored activation one SRAM write and one SRAM read (``2 * sram_access``, 10 pJ).

Biases are not counted, which matches the paper's figures. With ``M`` MACs, ``N_w`` weights and
``N_a`` activations::

    E_mac    = M · mac
    E_sram_w = N_w · sram_access
    E_sram_a = N_a · 2 · sram_access
    E_dram   = N_w · dram_access
    E_total  = E_mac + E_sram_w + E_sram_a + E_dram

    params_bits = N_w · bits_per_word
    total_bits  = (N_w + N_a) · bits_per_word

Counting rules (per inference):

* ``nn.Linear``: ``M = in_features · out_features`` per row, ``N_w = in_features · out_features``
  (a ``Linear`` subclass that gathers its input features is charged for the gathered ones);
* ``nn.Conv2d``: ``M = H_out · W_out · C_out · k_h · k_w · C_in / groups`` (``Conv1d`` and
  ``Conv3d`` likewise), ``N_w`` = elements of ``weight``;
* ``nn.Embedding`` (transformers): no MACs, ``N_w`` = the table; ``nn.LayerNorm``: one MAC per
  element, ``N_w`` = elements of its scale. Attention's matrix products have no module and are not
  counted;
* ``N_a`` = elements of the input of every counted layer, plus the elements of the model's output;
* BatchNorm, pooling, activations, dropout, flatten, LRN and any module whose class or instance sets
  ``_neuronprune_cost_free = True`` cost nothing. BatchNorm is free because the paper folds it into
  the neighbouring layer;
* any other module that owns parameters raises
  :class:`~lightning_neuronprune.errors.UnsupportedLayerError` unless a rule is registered for its
  type with :meth:`EnergyModel.with_rule`.

Example:
    >>> from lightning_neuronprune.models import LeNet300100
    >>> report = EnergyModel().estimate(LeNet300100(), torch.zeros(1, 1, 28, 28))
    >>> report.macs, report.weights, report.activations
    (266200, 266200, 1194)
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_neuronprune._runtime import evaluating
from lightning_neuronprune.errors import NeuronEliminationError, UnsupportedLayerError

__all__ = [
    "CountingRule",
    "EnergyModel",
    "EnergyReport",
    "LayerCount",
    "count_conv",
    "count_embedding",
    "count_layernorm",
    "count_linear",
    "count_nothing",
]

_COST_FREE_ATTRIBUTE = "_neuronprune_cost_free"


@dataclass(frozen=True)
class LayerCount:
    """Operation and storage counts of one layer.

    In :attr:`EnergyReport.per_layer` the counts are per inference. A :data:`CountingRule` returns
    them for the whole forward call it observes (all samples of the batch);
    :meth:`EnergyModel.estimate` then divides ``macs`` and ``activations`` by the batch size.
    ``weights`` is a property of the layer, not of the call, and is never divided.

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
    :class:`~lightning_neuronprune.surgery.GatheredLinear`) is charged for the gathered features
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
    }


def _ratio(numerator: float, denominator: float) -> float:
    if denominator:
        return numerator / denominator
    return math.inf if numerator else math.nan


@dataclass(frozen=True)
class EnergyReport:
    """Energy (joules) and memory (bits) of one inference.

    Args:
        macs: Multiply-accumulates ``M``.
        weights: Weight elements ``N_w`` (biases excluded).
        activations: Activation elements ``N_a``: inputs of the counted layers plus the output.
        output_activations: Elements of the model's output (included in ``activations``).
        mac: ``M · mac``.
        sram_weights: ``N_w · sram_access``.
        sram_activations: ``N_a · 2 · sram_access`` (one write and one read).
        dram: ``N_w · dram_access``.
        total: ``mac + sram_weights + sram_activations + dram``.
        params_bits: ``N_w · bits_per_word``.
        total_bits: ``(N_w + N_a) · bits_per_word``.
        per_layer: Per-inference counts of each counted layer, keyed by qualified module name.
    """

    macs: int
    weights: int
    activations: int
    output_activations: int
    mac: float
    sram_weights: float
    sram_activations: float
    dram: float
    total: float
    params_bits: int
    total_bits: int
    per_layer: Mapping[str, LayerCount] = field(default_factory=dict, hash=False, compare=False)

    def as_dict(self, per_layer: bool = False) -> dict[str, float]:
        """Return the scalar fields as a flat dictionary, e.g. for ``logger.log_metrics``.

        Args:
            per_layer: Also add ``"{layer}/macs"``, ``"{layer}/weights"`` and
                ``"{layer}/activations"`` entries.

        Returns:
            ``{"macs": ..., "weights": ..., ..., "total_bits": ...}``.
        """
        out: dict[str, float] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_layer"
        }
        if per_layer:
            for name, count in self.per_layer.items():
                for f in fields(count):
                    out[f"{name}/{f.name}"] = getattr(count, f.name)
        return out

    def ratio(self, other: EnergyReport) -> dict[str, float]:
        """Return ``self / other`` for every scalar field.

        With ``self`` the original network and ``other`` the reduced one, ``ratio["total"]`` is the
        energy reduction factor and ``ratio["params_bits"]`` the memory reduction factor. A zero
        denominator gives ``inf`` (or ``nan`` for ``0 / 0``).

        Args:
            other: The report to divide by.

        Returns:
            The ratios, keyed like :meth:`as_dict`.
        """
        mine, theirs = self.as_dict(), other.as_dict()
        return {key: _ratio(mine[key], theirs[key]) for key in mine}

    def energy_ratio(self, other: EnergyReport) -> float:
        """Return ``self.total / other.total``, e.g. original over reduced energy.

        Args:
            other: The report to divide by.

        Returns:
            The energy ratio.
        """
        return _ratio(self.total, other.total)

    def memory_ratio(self, other: EnergyReport, include_activations: bool = False) -> float:
        """Return ``self.params_bits / other.params_bits``, e.g. original over reduced memory.

        The paper's memory columns compare parameters only, the default here.

        Args:
            other: The report to divide by.
            include_activations: Compare ``total_bits`` (weights and activations) instead.

        Returns:
            The memory ratio.
        """
        if include_activations:
            return _ratio(self.total_bits, other.total_bits)
        return _ratio(self.params_bits, other.params_bits)


def _check_rule(module_type: Any, rule: Any) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"`rules` keys must be `nn.Module` subclasses, got {module_type!r}")
    if not callable(rule):
        raise ValueError(f"`rules[{module_type.__name__}]` must be callable, got {rule!r}")


@dataclass(frozen=True)
class EnergyModel:
    """Per-inference energy and memory model of a network (see the module docstring).

    Args:
        mac: Energy of one multiply-accumulate, joules (4.6 pJ at 45 nm, 32-bit float).
        sram_access: Energy of one SRAM access of a word, joules (5 pJ).
        dram_access: Energy of one DRAM access of a word, joules (640 pJ).
        bits_per_word: Bits stored per weight or activation (32).
        rules: Extra counting rules, ``{module type: rule}``. They apply to subclasses too; the most
            specific class in a module's MRO wins, and a rule given here overrides the built-in one
            for the same class (``nn.Linear``, ``nn.Conv1d/2d/3d``). A rule also takes precedence
            over the free treatment of BatchNorm.

    Raises:
        ValueError: If a constant is negative or not finite, ``bits_per_word`` is
            not a positive integer, or a rule is not a callable keyed by an ``nn.Module`` subclass.

    Example:
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gain = nn.Parameter(torch.ones(4))
        ...     def forward(self, x):
        ...         return x * self.gain
        >>> energy = EnergyModel(mac=1.0).with_rule(
        ...     Scale, lambda m, x, y: LayerCount(macs=x.numel(), weights=m.gain.numel())
        ... )
        >>> energy.estimate(Scale(), torch.zeros(2, 4)).macs
        4
    """

    mac: float = 4.6e-12
    sram_access: float = 5e-12
    dram_access: float = 640e-12
    bits_per_word: int = 32
    rules: Mapping[type[nn.Module], CountingRule] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("mac", "sram_access", "dram_access"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"`{name}` must be a finite, non-negative number of joules, got {value!r}"
                )
        bits = self.bits_per_word
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits <= 0:
            raise ValueError(f"`bits_per_word` must be a positive integer, got {bits!r}")
        if not isinstance(self.rules, Mapping):
            raise ValueError(f"`rules` must be a mapping, got {self.rules!r}")
        for module_type, rule in self.rules.items():
            _check_rule(module_type, rule)
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))

    def with_rule(self, module_type: type[nn.Module], rule: CountingRule) -> EnergyModel:
        """Return a copy of this model with a counting rule for ``module_type`` (and subclasses).

        Args:
            module_type: The module class the rule applies to.
            rule: ``rule(module, input, output) -> LayerCount`` for the whole call; see
                :data:`CountingRule`. Use :func:`count_nothing` to declare a type free.

        Returns:
            A new :class:`EnergyModel`.

        Raises:
            ValueError: If ``module_type`` is not an ``nn.Module`` subclass or
                ``rule`` is not callable.
        """
        _check_rule(module_type, rule)
        return replace(self, rules={**self.rules, module_type: rule})

    def estimate(
        self,
        model: nn.Module,
        example_input: Tensor | tuple[Any, ...] | list[Any],
        batch_size: int | None = None,
    ) -> EnergyReport:
        """Run ``model`` once on ``example_input`` and return the energy of one inference.

        The model runs under ``torch.no_grad()`` in eval mode, with forward hooks on the layers to
        count. Hooks are removed and every module's train/eval mode is restored afterwards, also
        on error. Counts are per inference: the MACs and activations of the call are divided by the
        batch size, so the result does not depend on it. Layers that the call does not reach are
        not counted.

        Args:
            model: The network. It must live on the device of ``example_input``.
            example_input: A batched input, or a tuple/list of positional inputs.
            batch_size: Number of samples in ``example_input``. By default the size of the first
                dimension of the first tensor in ``example_input``. Pass ``1`` for an unbatched
                input.

        Returns:
            The :class:`EnergyReport`.

        Raises:
            UnsupportedLayerError: If the call reaches a module that owns parameters and has no
                counting rule (the message names every such module and its type).
            NeuronEliminationError: If a per-inference count is not an integer, i.e. a count is not
                divisible by the batch size, or a rule does not return a :class:`LayerCount`.
            ValueError: If ``batch_size`` is not a positive integer or cannot be
                inferred.
        """
        args = (
            tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
        )
        batch = _infer_batch_size(args) if batch_size is None else batch_size
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch <= 0:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch!r}")

        counted, unsupported = _plan(model, {**_builtin_rules(), **self.rules})
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
                output = model(*args)
        finally:
            for handle in handles:
                handle.remove()

        if reached_unsupported:
            listing = ", ".join(
                f"{name!r} ({type(module).__name__})"
                for name, module in reached_unsupported.items()
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
        return self.report(per_layer, output_activations)

    def report(self, per_layer: Mapping[str, LayerCount], output_activations: int) -> EnergyReport:
        """Price per-inference counts, e.g. counts computed without running a model.

        Args:
            per_layer: Per-inference counts of each layer.
            output_activations: Elements of the network output of one inference.

        Returns:
            The :class:`EnergyReport`, with ``N_a = sum(activations) + output_activations``.
        """
        macs = sum(count.macs for count in per_layer.values())
        weights = sum(count.weights for count in per_layer.values())
        activations = sum(count.activations for count in per_layer.values()) + output_activations
        mac = macs * self.mac
        sram_weights = weights * self.sram_access
        sram_activations = activations * 2 * self.sram_access
        dram = weights * self.dram_access
        return EnergyReport(
            macs=macs,
            weights=weights,
            activations=activations,
            output_activations=output_activations,
            mac=mac,
            sram_weights=sram_weights,
            sram_activations=sram_activations,
            dram=dram,
            total=mac + sram_weights + sram_activations + dram,
            params_bits=weights * self.bits_per_word,
            total_bits=(weights + activations) * self.bits_per_word,
            per_layer=MappingProxyType(dict(per_layer)),
        )


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
