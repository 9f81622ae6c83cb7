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
  ``"fck:in"``;
* ``"conv1"`` (a ``Conv1d``/``Conv2d``): its output channels, a ``kind="conv"`` junction found by
  :func:`~lightning_neuronprune.structure.conv_tracing.conv_junction` (by tracing, or by a
  :class:`~lightning_neuronprune.structure.conv_probe.ConvProbe` given an example);
  ``"conv2:in"`` names the same junction from a conv consumer. :func:`auto_conv_junctions` lists
  every conv junction of a model (``targets="auto"`` lists Linear layers only).

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
import warnings
from typing import Any

from torch import nn

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
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
from lightning_neuronprune.structure.tracing import traced_consumer, traced_producer

log = logging.getLogger(__name__)

__all__ = ["auto_conv_junctions", "auto_junctions", "find_junction"]


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


def _producer_junction(
    model: nn.Module,
    target: str,
    producer: str,
    consumer: str | None,
    probe: JunctionProbe | None = None,
) -> Junction:
    prod = get_linear(model, producer)
    _check_not_shared(model, producer)
    if probe is not None:
        return _probed_junction(model, target, producer, consumer, probe)
    traced = traced_consumer(model, producer)
    if traced is not None:
        found, bn, path = traced
        if consumer is not None and consumer != found:
            raise JunctionError(
                f"the consumer of {producer!r} is {found!r}, not the given consumer {consumer!r}"
            )
        return _finish(model, target, "producer", producer, found, bn, prod.out_features, path)
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
        traced = traced_consumer(model, producer)
    except JunctionError as err:  # the probe may accept what tracing cannot prove
        log.debug("tracing refused %s (%s); probing", producer, err)
        traced = None
    found = probe.find(producer)
    if traced is not None and (traced[0], traced[1]) != (found.consumer, found.batchnorm):
        raise JunctionError(
            f"tracing and probing disagree on {producer!r}: the traced code gives consumer "
            f"{traced[0]!r} (batch norm {traced[1]!r}), the probe {found.consumer!r} (batch norm "
            f"{found.batchnorm!r})"
        )
    if consumer is not None and consumer != found.consumer:
        raise JunctionError(
            f"the consumer of {producer!r} is {found.consumer!r}, not the given consumer "
            f"{consumer!r}"
        )
    path = traced[2] if traced is not None else found.path
    n = model.get_submodule(producer).out_features
    return _finish(model, target, "producer", producer, found.consumer, found.batchnorm, n, path)


def _finish(
    model: nn.Module,
    target: str,
    kind: Kind,
    producer: str | None,
    consumer: str,
    batchnorm: str | None,
    n: int,
    path: tuple[str, ...],
) -> Junction:
    cons = get_linear(model, consumer)
    _check_not_shared(model, consumer)
    if kind == "producer" and isinstance(cons, GatheredLinear):
        raise JunctionError(
            f"consumer {consumer!r} of {producer!r} already gathers its input features; reduce "
            f"{producer!r} before {consumer + INPUT_SUFFIX!r}, not after"
        )
    if batchnorm is not None:
        bn = model.get_submodule(batchnorm)
        if not isinstance(bn, nn.BatchNorm1d) or bn.num_features != n:
            raise JunctionError(f"BatchNorm1d {batchnorm!r} does not have {n} features")
        _check_not_shared(model, batchnorm)
    return Junction(target, kind, producer, consumer, batchnorm, n, path)


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

    Raises:
        JunctionError: the name does not exist or is not an ``nn.Linear``; the layer is shared or
            tied; its output feeds several consumers, passes a feature-mixing op, or is the
            network output.
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
    model: nn.Module, *, example: Any = None, probe: JunctionProbe | None = None
) -> list[Junction]:
    """Every ``nn.Linear`` of ``model`` whose output neurons have a consumer, in module order.

    Each layer is resolved by :func:`find_junction`; with an ``example`` (or a ready ``probe``),
    one shared :class:`~lightning_neuronprune.structure.probe.JunctionProbe` decides (one baseline
    pass,
    then a few passes per layer, most refusals after one or two). Layers that are refused are
    skipped and logged at debug level. In a transformer block this keeps the FFN pairs (BERT's
    ``intermediate.dense`` → ``output.dense``, DistilBERT's ``lin1`` → ``lin2``, ``fc1`` →
    ``fc2``) and skips the attention projections (heads, softmax), the layers before a residual
    sum and LayerNorm, and gated MLPs.
    """
    if probe is None and example is not None:
        probe = JunctionProbe(model, example)
    junctions = []
    for name in linear_layer_names(model):
        try:
            junctions.append(find_junction(model, name, probe=probe))
        except JunctionError as err:
            log.debug("auto targets: skipping %s (%s)", name, err)
    return junctions


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
