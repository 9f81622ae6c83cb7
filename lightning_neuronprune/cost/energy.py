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

The counts ``M``, ``N_w`` and ``N_a`` of each layer come from per-module counting rules
(:mod:`lightning_neuronprune.cost.counting`: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``,
``nn.LayerNorm``; BatchNorm, activations and pooling are free; any other module that owns
parameters needs a rule registered with :meth:`EnergyModel.with_rule`).

Example:
    >>> import torch
    >>> from lightning_neuronprune.testing.models import LeNet300100
    >>> report = EnergyModel().estimate(LeNet300100(), torch.zeros(1, 1, 28, 28))
    >>> report.macs, report.weights, report.activations
    (266200, 266200, 1194)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from lightning_neuronprune.cost.counting import CountingRule, LayerCount, count_inference

__all__ = ["EnergyModel", "EnergyReport"]


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

    def __reduce__(self) -> tuple[Any, ...]:
        # A read-only ``per_layer`` view does not pickle; reports cross processes (DDP).
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return (_report_from, (values | {"per_layer": dict(self.per_layer)},))

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
        >>> import torch
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
        per_layer, output_activations = count_inference(
            model, example_input, self.rules, batch_size
        )
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


def _report_from(fields: dict[str, Any]) -> EnergyReport:
    """Rebuild a pickled :class:`EnergyReport`, its ``per_layer`` read-only again."""
    return EnergyReport(**{**fields, "per_layer": MappingProxyType(dict(fields["per_layer"]))})
