"""Finding junctions: where a producer ``nn.Linear`` feeds a consumer ``nn.Linear``.

A *junction* is where a producer ``nn.Linear`` feeds a consumer ``nn.Linear`` through elementwise
modules only (ReLU, GELU, Tanh, Sigmoid, LeakyReLU, Dropout, Identity, flatten...) and at most one
``BatchNorm1d``. Keeping p of its n features means:

* the producer keeps p rows of its weight and bias (``kind="producer"``), and so does the
  ``BatchNorm1d``;
* the consumer gets the re-fitted weight ``W_p`` (m × p).

When there is no producer row to delete (the consumer reads the network input or a flattened conv
output), the consumer is replaced by a
:class:`~lightning_neuronprune.structure.modules.GatheredLinear` that selects the kept input
features itself (``kind="gather"``).

Targets are named like this:

* ``"fc1"``: the output neurons of ``fc1`` (the paper's "FC2" row for LeNet-300-100, which names
  a junction by its consumer);
* ``"fc2:in"``: the input features of ``fc2``. This resolves to the same junction as ``"fc1"``
  when ``fc1`` feeds ``fc2`` directly, and to a gather junction otherwise. The paper's "FCk" is
  ``"fck:in"``.
* gated FFNs (``kind="gated"``): ``"model.layers.0.mlp.gate_proj"`` and ``"...up_proj"`` both
  resolve to the one junction of ``gate_proj`` and ``up_proj`` → ``down_proj`` (named by the
  first producer in module order; Phi-3's fused ``"...mlp.gate_up_proj"``, T5's
  ``"...DenseReluDense.wi_0"``). ``"...mlp.down_proj:in"`` resolves to it too where
  :mod:`torch.fx` traces the MLP (Llama, Mistral, Qwen2, Gemma, Phi-3); in a model it cannot
  trace (T5) it is a gather junction, so name a producer there. Expert FFNs of a
  mixture-of-experts block, gates read twice, shared or tied weights and gate/up producers of
  different widths are refused, with the cause named;
* ``"conv1"`` (a ``Conv1d``/``Conv2d``): its output channels, a ``kind="conv"`` junction found by
  :func:`~lightning_neuronprune.structure.conv_tracing.conv_junction` (by tracing, or by a
  :class:`~lightning_neuronprune.structure.conv_probe.ConvProbe` given an example);
  ``"conv2:in"`` names the same junction from a conv consumer. :func:`auto_conv_junctions` lists
  every conv junction of a model.

:func:`find_junction` checks the names (the layers exist, are ``nn.Linear`` and are not shared
or tied) and finds the consumer by tracing the model with :mod:`torch.fx`
(:mod:`~lightning_neuronprune.structure.tracing`), starting from the innermost module that holds
the target and moving outwards; or, given an example batch, by its behaviour on it
(:mod:`~lightning_neuronprune.structure.probe`), which also reaches untraceable models (Hugging
Face transformers) and custom activation modules. A found
:class:`~lightning_neuronprune.structure.junction.Junction` is what
:mod:`~lightning_neuronprune.structure.surgery` reduces;
:mod:`~lightning_neuronprune.structure.targets`
resolves the user's target names with :func:`find_junction` and :func:`auto_junctions`.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.structure.blocks import RepeatedBlocks
from lightning_neuronprune.structure.conv_tracing import conv_junction, conv_layer_names
from lightning_neuronprune.structure.junction import (
    INPUT_SUFFIX,
    Junction,
    Kind,
    get_linear,
    linear_layer_names,
)
from lightning_neuronprune.structure.modules import GatheredLinear
from lightning_neuronprune.structure.probe import JunctionProbe
from lightning_neuronprune.structure.tracing import TracedJunction, traced_junction, traced_producer

log = logging.getLogger(__name__)

__all__ = ["auto_conv_junctions", "auto_junctions", "find_junction", "find_junctions"]


def _check_not_shared(model: nn.Module, name: str) -> None:
    """Refuse modules registered under two names or whose parameters are tied elsewhere."""
    module = model.get_submodule(name)
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
    if len(aliases) > 1:
        raise JunctionError(
            f"layer {name!r} is shared: the same module is registered as {aliases}; "
            "removing its neurons would change every use of it"
        )
    own = {id(p) for p in module.parameters()}
    for pname, param in model.named_parameters(remove_duplicate=False):
        if id(param) in own and not pname.startswith(name + "."):
            raise JunctionError(
                f"layer {name!r} has weights tied to {pname!r}; shared or tied weights cannot be "
                "reduced independently"
            )


_EXPERT_SCOPE = re.compile(r"(^|\.)(experts?|shared_experts?|moe)(\.|$)", re.IGNORECASE)
_EXPERT_TYPE = re.compile(r"(Mo[Ee]|MixtureOfExperts)(Block|Layer)$|Experts?$")


def _check_not_expert(model: nn.Module, name: str) -> None:
    """Refuse layers inside a mixture-of-experts block (routing sends each token to a few
    experts, so one expert's statistics and a shared width do not describe the block)."""
    parts = name.split(".")
    for i in range(len(parts)):
        scope = ".".join(parts[:i])
        module = model.get_submodule(scope) if scope else model
        kind = type(module).__name__
        if _EXPERT_TYPE.search(kind) or _EXPERT_SCOPE.search(scope):
            raise JunctionError(
                f"layer {name!r} lies in a mixture-of-experts block ({scope or 'the model'!r}, "
                f"{kind}); expert FFNs (MoE) are not supported"
            )


def _producer_junction(
    model: nn.Module,
    target: str,
    producer: str,
    consumer: str | None,
    probe: JunctionProbe | None = None,
) -> Junction:
    prod = get_linear(model, producer)
    _check_not_shared(model, producer)
    _check_not_expert(model, producer)
    if probe is not None:
        return _probed_junction(model, target, producer, consumer, probe)
    traced = traced_junction(model, producer)
    if traced is not None:
        if consumer is not None and consumer != traced.consumer:
            raise JunctionError(
                f"the consumer of {producer!r} is {traced.consumer!r}, not the given consumer "
                f"{consumer!r}"
            )
        return _from_traced(model, target, traced)
    if consumer is None:
        raise UndecidedJunctionError(
            f"could not find the consumer of {producer!r}: the model could not be traced with "
            "torch.fx. Give an example batch (`example=`) to find it by probing, or pass "
            "`consumer=` explicitly"
        )
    cons = get_linear(model, consumer)
    if cons.in_features != prod.out_features:
        raise JunctionError(
            f"consumer {consumer!r} reads {cons.in_features} features but {producer!r} produces "
            f"{prod.out_features}"
        )
    warnings.warn(
        f"the path from {producer!r} to {consumer!r} could not be traced; assuming only "
        "elementwise modules lie between them (give `example=` to check it by probing)",
        UserWarning,
        stacklevel=3,
    )
    return _finish(model, target, "producer", producer, consumer, None, prod.out_features, ())


def _probed_junction(
    model: nn.Module, target: str, producer: str, consumer: str | None, probe: JunctionProbe
) -> Junction:
    """The probe decides; a successful trace must agree with it (a cross-check)."""
    try:
        traced = traced_junction(model, producer)
    except JunctionError as err:  # the probe may accept what tracing cannot prove
        log.debug("tracing refused %s (%s); probing", producer, err)
        traced = None
    if traced is not None and traced.gated:  # the structure's own checks (widths) first
        _from_traced(model, target, traced)
    found = probe.find(producer)
    probed = (found.consumer, found.batchnorm, found.producers, found.fused)
    if (
        traced is not None
        and (traced.consumer, traced.batchnorm, traced.producers, traced.fused) != probed
    ):
        raise JunctionError(
            f"tracing and probing disagree on {producer!r}: the traced code gives consumer "
            f"{traced.consumer!r} (batch norm {traced.batchnorm!r}, producers "
            f"{list(traced.producers)}), the probe {found.consumer!r} (batch norm "
            f"{found.batchnorm!r}, producers {list(found.producers)})"
        )
    if consumer is not None and consumer != found.consumer:
        raise JunctionError(
            f"the consumer of {producer!r} is {found.consumer!r}, not the given consumer "
            f"{consumer!r}"
        )
    path = traced.path if traced is not None else found.path
    return _from_traced(
        model,
        target,
        TracedJunction(found.consumer, found.batchnorm, path, found.producers, found.fused),
    )


def _from_traced(model: nn.Module, target: str, found: TracedJunction) -> Junction:
    """Check a found junction's layers and widths, and make it a :class:`Junction`."""
    first = found.producers[0]
    if not found.gated:
        n = get_linear(model, first).out_features
        return _finish(model, target, "producer", first, found.consumer, found.batchnorm, n,
                       found.path)  # fmt: skip
    widths = {}
    for name in found.producers:
        widths[name] = get_linear(model, name).out_features
        _check_not_shared(model, name)
        _check_not_expert(model, name)
    n_in = get_linear(model, found.consumer).in_features
    if found.fused and widths[first] != 2 * n_in:
        raise JunctionError(
            f"the fused gate/up producer {first!r} has {widths[first]} outputs, but its halves "
            f"feed {found.consumer!r}, which reads {n_in}; it needs 2 × {n_in}"
        )
    if not found.fused and set(widths.values()) != {n_in}:
        raise JunctionError(
            f"mismatched gate/up widths: the producers {widths} of the gated junction of "
            f"{found.consumer!r} must each have {n_in} outputs, as many as it reads"
        )
    return _finish(
        model, target, "gated", first, found.consumer, found.batchnorm, n_in, found.path,
        producers=found.producers, fused=found.fused,
    )  # fmt: skip


def _finish(
    model: nn.Module,
    target: str,
    kind: Kind,
    producer: str | None,
    consumer: str,
    batchnorm: str | None,
    n: int,
    path: tuple[str, ...],
    *,
    producers: tuple[str, ...] = (),
    fused: bool = False,
) -> Junction:
    cons = get_linear(model, consumer)
    _check_not_shared(model, consumer)
    if kind != "gather" and isinstance(cons, GatheredLinear):
        raise JunctionError(
            f"consumer {consumer!r} of {producer!r} already gathers its input features; reduce "
            f"{producer!r} before {consumer + INPUT_SUFFIX!r}, not after"
        )
    if batchnorm is not None:
        bn = model.get_submodule(batchnorm)
        if not isinstance(bn, nn.BatchNorm1d) or bn.num_features != n:
            raise JunctionError(f"BatchNorm1d {batchnorm!r} does not have {n} features")
        _check_not_shared(model, batchnorm)
    if kind == "gated" and batchnorm is not None:
        raise JunctionError(
            f"a BatchNorm1d ({batchnorm!r}) lies on the gated path to {consumer!r}; gated "
            "junctions with a batch norm are not supported"
        )
    return Junction(target, kind, producer, consumer, batchnorm, n, path, producers, fused)


def find_junction(
    model: nn.Module,
    target: str,
    consumer: str | None = None,
    *,
    example: Any = None,
    probe: JunctionProbe | None = None,
) -> Junction:
    """Resolve a target name to a :class:`Junction`, or refuse with a :class:`JunctionError`.

    Without an example, the junction is found by tracing with :mod:`torch.fx`. With one (or a
    ready ``probe``), a behavioural probe on that batch decides
    (:class:`~lightning_neuronprune.structure.probe.JunctionProbe`): it finds consumers that tracing
    cannot (untraceable ``forward``, custom activation modules), refuses what behaves as a
    feature mix, and must agree with the trace where the model traces. Its cost is a few forward
    passes on the example (at most 2 + 2⌈log₂ n⌉ for n features, plus one shared baseline).

    Args:
        model: the network.
        target: ``"<linear>"`` for a layer's output neurons, ``"<linear>:in"`` for its inputs.
        consumer: the consumer's name, when it cannot be found by tracing (checked by the probe
            when there is one).
        example: one model input (a few samples), on the model's device, for the probe.
        probe: a probe built on an example, to share its baseline pass between targets.

    A gated FFN (``down(act(gate(x)) * up(x))``, or a fused ``gate_up_proj``) is one
    ``kind="gated"`` junction, whichever of its producers is named.

    Raises:
        JunctionError: the name does not exist or is not an ``nn.Linear``; the layer is shared or
            tied, or an expert of a mixture-of-experts block; its output feeds several consumers,
            passes a feature-mixing op, or is the network output; a gated FFN's producers have
            different widths or a gate is read twice.
    """
    if not isinstance(target, str) or not target:
        raise JunctionError(f"a target must be a non-empty layer name, got {target!r}")
    conv = conv_junction(  # a conv's channels: by tracing, or by a ConvProbe on the example
        model, target, consumer, example=getattr(probe, "example", example),
        call=getattr(probe, "call", None),
    )  # fmt: skip
    if conv is not None:
        for name in filter(None, (conv.producer, conv.batchnorm, conv.consumer)):
            _check_not_shared(model, name)
        return conv
    if probe is None and example is not None and not target.endswith(INPUT_SUFFIX):
        probe = JunctionProbe(model, example)
    if target.endswith(INPUT_SUFFIX):
        cons_name = target[: -len(INPUT_SUFFIX)]
        cons = get_linear(model, cons_name)
        producer = traced_producer(model, cons_name)
        if producer is not None:
            try:
                return _producer_junction(model, target, producer, cons_name)
            except JunctionError:
                pass
        return _finish(model, target, "gather", None, cons_name, None, cons.in_features, ())
    return _producer_junction(model, target, target, consumer, probe)


def auto_junctions(
    model: nn.Module,
    *,
    example: Any = None,
    probe: JunctionProbe | None = None,
    undecided: list[str] | None = None,
) -> list[Junction]:
    """Every ``nn.Linear`` of ``model`` whose output neurons have a consumer, in module order.

    Each layer is resolved by :func:`find_junction`; with an ``example`` (or a ready ``probe``),
    one shared :class:`~lightning_neuronprune.structure.probe.JunctionProbe` decides (one baseline
    pass, then a few passes per layer, most refusals after one or two). Layers that are refused
    are skipped and logged at debug level. In a transformer block this keeps the FFN pairs
    (BERT's ``intermediate.dense`` → ``output.dense``, DistilBERT's ``lin1`` → ``lin2``,
    ``fc1`` → ``fc2``) and the gated FFNs (Llama, Mistral, Qwen2 and Gemma's ``gate_proj`` and
    ``up_proj`` → ``down_proj``, Phi-3's fused ``gate_up_proj``, T5's ``wi_0`` and ``wi_1`` →
    ``wo``; one junction each, named by the first producer), and skips the attention
    projections (heads, softmax) and the layers before a residual sum and a norm.

    **Cost on deep models.** Repeated blocks (the elements of a ``ModuleList`` or
    ``Sequential``) with identical structure (module names, types, settings and tensor shapes)
    are decided once: the first block of each kind is probed (or traced), and every later block
    gets the same verdicts, with its junctions' layers, widths and sharing checked by structure
    only. The probe runs that first block alone on its recorded inputs wherever the verdict can
    be decided inside it (see :mod:`~lightning_neuronprune.structure.probe`), so a decoder of L
    identical blocks costs the baseline forward, one forward for each layer whose output leaves
    its block (the FFN's down projection before the residual sum) or lies outside any block
    (``lm_head``), and the passes of one block, each about 1/L of a forward. A junction that
    leaves its block is not reused; the same layer of the next block is decided afresh.

    Args:
        model: the network.
        example: one model input for a probe (see :func:`find_junction`).
        probe: a probe built on an example, shared with the caller.
        undecided: without a probe, the layers that tracing could not decide are appended here
            (instead of being skipped).
    """
    if probe is None and example is not None:
        probe = JunctionProbe(model, example)
    blocks = RepeatedBlocks(model)
    junctions: list[Junction] = []
    covered: set[str] = set()
    for name in linear_layer_names(model):
        if name in covered:
            continue
        try:
            junction = blocks.decide(
                name, lambda n: find_junction(model, n, probe=probe), _checked(model)
            )
        except JunctionError as err:
            _skip(name, err, undecided, probe)
            continue
        junctions.append(junction)
        covered.update(junction.producers)
    return junctions


def find_junctions(
    model: nn.Module,
    targets: Sequence[str],
    consumers: Mapping[str, str] | None = None,
    *,
    probe: JunctionProbe | None = None,
) -> list[Junction]:
    """:func:`find_junction` for each target, with the verdicts of identical repeated blocks
    shared as in :func:`auto_junctions` (``"model.layers.{i}.mlp.gate_proj"`` for 30 layers
    costs the probe passes of one). Targets with an explicit consumer are decided one by one.

    Raises:
        JunctionError: the first target that cannot be simplified.
    """
    consumers = dict(consumers or {})
    blocks = RepeatedBlocks(model)
    convs = set(conv_layer_names(model))  # decided one by one: a moved junction is a Linear's
    found = []
    for target in targets:
        if (
            target in consumers
            or not isinstance(target, str)
            or target.endswith(INPUT_SUFFIX)
            or target in convs
        ):
            found.append(find_junction(model, target, consumers.get(target), probe=probe))
        else:
            find = lambda n: find_junction(model, n, probe=probe)  # noqa: E731
            found.append(blocks.decide(target, find, _checked(model)))
    return found


def _checked(model: nn.Module) -> Callable[[str, TracedJunction], Junction]:
    """Check a junction moved from an identical block by structure (layers, widths, sharing)."""
    return lambda name, moved: _from_traced(model, name, moved)


def _skip(
    name: str, err: JunctionError, undecided: list[str] | None, probe: JunctionProbe | None
) -> None:
    if undecided is not None and probe is None and isinstance(err, UndecidedJunctionError):
        undecided.append(name)
    else:
        log.debug("auto targets: skipping %s (%s)", name, err)


def auto_conv_junctions(model: nn.Module) -> list[Junction]:
    """Every conv of ``model`` whose output channels have a consumer (``kind="conv"``), in module
    order, found by tracing. Refused convs are skipped and logged at debug level: in a ResNet this
    keeps the inner channels of each block (``conv1 → conv2``, and ``conv2 → conv3`` of a
    bottleneck) and skips the stem, the last conv of each block and the downsampling convs
    (residual stream)."""
    junctions = []
    for name in conv_layer_names(model):
        try:
            junctions.append(find_junction(model, name))
        except JunctionError as err:
            log.debug("auto conv targets: skipping %s (%s)", name, err)
    return junctions
