"""Finding conv junctions by tracing the model with :mod:`torch.fx`.

From a producer conv (``nn.Conv1d``/``nn.Conv2d`` with ``groups=1``) the walk follows the output
through per-channel maps (the elementwise ops of
:mod:`~lightning_neuronprune.structure.tracing`, pooling, channel dropout) and at most one batch
norm to the consumer: a conv, or an ``nn.Linear`` after a flatten from dimension 1
(``flatten(x, 1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``, ``x.view(-1, C·H·W)``). It
refuses, naming the cause:

* channels on a residual stream: the output (or what it became on the way) is read by an
  addition, whose other summand fixes the number of channels (ResNet's ``conv2``, the stem);
* a concatenation (``torch.cat``, ``torch.stack``);
* an output that feeds several layers;
* grouped and depthwise convolutions, as producer or consumer: a group reads only its own
  channels, so ``x ≈ T x_S`` cannot pass through it;
* anything else that is not known to act on each channel alone (``view``, a product with another
  tensor, ...).

:func:`conv_junction` builds the :class:`~lightning_neuronprune.structure.junction.Junction`
(``kind="conv"``); :func:`~lightning_neuronprune.structure.discovery.find_junction` calls it for
conv targets. Targets are named like Linear ones: ``"conv1"`` for conv1's output channels,
``"conv2:in"`` for conv2's input channels (the same junction).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.structure.conv import CHANNEL_NORMS, CONV_LAYERS
from lightning_neuronprune.structure.conv_probe import ConvProbe
from lightning_neuronprune.structure.junction import INPUT_SUFFIX, Junction
from lightning_neuronprune.structure.modules import GatheredLinear
from lightning_neuronprune.structure.tracing import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    LeafTracer,
)

__all__ = [
    "PER_CHANNEL_FUNCTIONS",
    "PER_CHANNEL_MODULES",
    "conv_junction",
    "conv_layer_names",
    "output_batchnorm",
    "traced_conv_consumer",
    "traced_conv_producer",
]

#: Modules that act on each channel alone (besides the elementwise ones).
PER_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool1d, nn.LPPool2d,
    nn.Dropout1d, nn.Dropout2d,
)  # fmt: skip

#: Functions that act on each channel alone (besides the elementwise ones).
PER_CHANNEL_FUNCTIONS: frozenset[object] = frozenset({
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.dropout1d,
    F.dropout2d,
})  # fmt: skip

_ADDS = frozenset({operator.add, operator.iadd, operator.sub, torch.add, torch.sub})
_ADD_METHODS = frozenset({"add", "add_", "sub", "sub_"})
_CATS = frozenset({torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack})
_FLATTENS = frozenset({torch.flatten})


def conv_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every conv of ``model`` whose channels a junction can keep."""
    return [name for name, m in model.named_modules() if isinstance(m, CONV_LAYERS)]


def _describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _traced_scopes(
    model: nn.Module, name: str
) -> Iterator[tuple[str, torch.fx.Graph, dict[str, nn.Module], str]]:
    """The modules enclosing ``name`` that trace, innermost first: ``(scope, graph, modules,
    name relative to the scope)``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        scope = ".".join(parts[:i])
        root = model.get_submodule(scope) if scope else model
        try:
            graph = LeafTracer().trace(root)
        except Exception:  # any tracing failure means "try the enclosing scope"
            continue
        yield scope, graph, dict(root.named_modules()), ".".join(parts[i:])


class _Outward(Exception):
    """The walk left the traced scope; retry in the enclosing one."""


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _is_cat(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CATS


def _is_metadata(node: torch.fx.Node) -> bool:
    """A read of the shape (``x.size(0)``, ``x.shape``), not of the values."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in ("shape", "ndim")
    )


def _is_batch_size(arg: Any) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` in a traced graph."""
    if not isinstance(arg, torch.fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return arg.args[1:] == (0,) or arg.kwargs.get("dim") == 0
    return (
        arg.op == "call_function"
        and arg.target is operator.getitem
        and arg.args[1] == 0
        and isinstance(arg.args[0], torch.fx.Node)
        and _is_metadata(arg.args[0])
    )


def _view_flattens(node: torch.fx.Node) -> bool:
    """``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.view(-1, k)`` or
    ``torch.reshape(x, (B, -1))``: a flatten from dimension 1 (``k`` = C·H·W, or the consumer
    could not run)."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = tuple(node.args[1:])
    elif node.op == "call_function" and node.target is torch.reshape and len(node.args) > 1:
        shape = (node.args[1],)
    else:
        return False
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 2 and (
        (shape[1] == -1 and _is_batch_size(shape[0]))
        or (shape[0] == -1 and isinstance(shape[1], int) and shape[1] > 0)
    )


def _flatten_dims(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> tuple[int, int] | None:
    """``(start_dim, end_dim)`` of a flatten node, or ``None`` if it is no flatten."""
    if _view_flattens(node):
        return 1, -1
    if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Flatten):
        m = modules[str(node.target)]
        return m.start_dim, m.end_dim
    if (node.op == "call_function" and node.target in _FLATTENS) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        args = list(node.args[1:]) + [None, None]
        start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
        end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
        return start, end
    return None


def _per_channel(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], (*ELEMENTWISE_MODULES, *PER_CHANNEL_MODULES))
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS or node.target in PER_CHANNEL_FUNCTIONS
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return False


def _walk_forward(
    graph: torch.fx.Graph, modules: Mapping[str, nn.Module], producer_rel: str, producer: str
) -> tuple[str, str | None, tuple[str, ...]]:
    """From the producer conv's call, follow its channels to the consumer."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == producer_rel]
    if len(calls) != 1:
        raise JunctionError(
            f"layer {producer!r} is called {len(calls)} times in the forward pass; a layer used "
            "more than once cannot be reduced"
        )
    node, batchnorm, path, flat = calls[0], None, [], False
    while True:
        users = [u for u in node.users if not _is_metadata(u)]  # x.size(0) reads no values
        where = f"the output channels of {producer!r} (after {path or 'nothing'})"
        if not users:
            raise JunctionError(f"the output of {producer!r} is never used, so it has no consumer")
        adds = [_describe(u, modules) for u in users if _is_add(u)]
        if adds:
            raise JunctionError(
                f"{where} are on a residual stream: they are read by an addition ({adds[0]}), "
                "whose other summand fixes their number; only channels inside a block (e.g. "
                "a ResNet block's conv1 → conv2) can be reduced"
            )
        cats = [_describe(u, modules) for u in users if _is_cat(u)]
        if cats:
            raise JunctionError(
                f"{where} are concatenated with other channels ({cats[0]}); a conv junction "
                "must reach a single consumer through per-channel maps"
            )
        if len(users) > 1:
            raise UndecidedJunctionError(
                f"{where} feed {len(users)} layers: {[_describe(u, modules) for u in users]}; a "
                "conv junction must have exactly one consumer"
            )
        user = users[0]
        if user.op == "output":
            raise _Outward
        if (
            user.args
            and user.args[0] is not node
            or any(a is node for a in list(user.args[1:]) + list(user.kwargs.values()))
        ):
            raise UndecidedJunctionError(
                f"{where} reach {_describe(user, modules)} as a secondary argument; only "
                "per-channel maps may lie between producer and consumer"
            )
        dims = _flatten_dims(user, modules)
        m = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(m, CONV_LAYERS) and not flat:
            return str(user.target), batchnorm, tuple(path)
        if isinstance(m, nn.Linear):
            if not flat:
                raise JunctionError(
                    f"{where} reach nn.Linear {user.target!r} without a flatten: it would mix "
                    "positions, not channels"
                )
            return str(user.target), batchnorm, tuple(path)
        if isinstance(m, CHANNEL_NORMS) and batchnorm is None and not flat:
            batchnorm = str(user.target)
        elif dims is not None:
            if flat or tuple(dims) != (1, -1):
                raise UndecidedJunctionError(
                    f"{where} are flattened by {_describe(user, modules)} with (start_dim, "
                    f"end_dim) = {tuple(dims)}; only a flatten from dimension 1 to the end keeps "
                    "each channel's positions together"
                )
            flat = True
        elif not _per_channel(user, modules) or (flat and isinstance(m, PER_CHANNEL_MODULES)):
            raise UndecidedJunctionError(
                f"between {producer!r} and its consumer lies {_describe(user, modules)}, which "
                "mixes channels or is not known to act on each channel alone; only elementwise "
                "maps, pooling, channel dropout, one batch norm and a final flatten may lie "
                "between a conv and its consumer"
            )
        path.append(_describe(user, modules))
        node = user


def traced_conv_consumer(
    model: nn.Module, producer: str
) -> tuple[str, str | None, tuple[str, ...]] | None:
    """``(consumer, batchnorm, path)`` of a producer conv by :mod:`torch.fx`, or ``None`` if no
    enclosing scope traced.

    Raises:
        JunctionError: the traced code refuses the junction (see the module docstring).
    """
    root_traced = False
    for scope, graph, modules, rel in _traced_scopes(model, producer):
        root_traced = root_traced or scope == ""
        try:
            cons, bn, path = _walk_forward(graph, modules, rel, producer)
        except _Outward:
            continue
        prefix = scope + "." if scope else ""
        return prefix + cons, (prefix + bn if bn is not None else None), path
    if root_traced:
        raise JunctionError(
            f"could not find the consumer of {producer!r}: its output is the network output"
        )
    return None


def traced_conv_producer(model: nn.Module, consumer: str) -> str | None:
    """The conv whose channels reach conv ``consumer`` through single-user per-channel maps and
    at most one batch norm, found in the innermost enclosing module that traces, or ``None``."""
    for scope, graph, modules, rel in _traced_scopes(model, consumer):
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == rel]
        if len(calls) != 1:
            return None
        node = calls[0].args[0] if calls[0].args else None
        while isinstance(node, torch.fx.Node) and len(node.users) == 1:
            m = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(m, CONV_LAYERS):
                return f"{scope}.{node.target}" if scope else str(node.target)
            if not (isinstance(m, CHANNEL_NORMS) or _per_channel(node, modules)):
                return None
            node = node.args[0] if node.args else None
        return None
    return None


def output_batchnorm(model: nn.Module, layer: str) -> str | None:
    """The batch norm that directly and only reads ``layer``'s output (``conv → BatchNorm2d``),
    found by tracing the innermost enclosing module that traces, or ``None``."""
    out = getattr(model.get_submodule(layer), "out_channels", None)
    out = getattr(model.get_submodule(layer), "out_features", out)
    for scope, graph, modules, rel in _traced_scopes(model, layer):
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == rel]
        users = [u for c in calls for u in c.users if not _is_metadata(u)]
        if len(calls) != 1 or len(users) != 1 or users[0].op != "call_module":
            return None
        bn = modules[str(users[0].target)]
        if isinstance(bn, CHANNEL_NORMS) and bn.num_features == out:
            return f"{scope}.{users[0].target}" if scope else str(users[0].target)
        return None
    return None


def _grouped(name: str, module: nn.Module, role: str) -> JunctionError:
    kind = "depthwise" if module.groups == module.in_channels else "grouped"
    return JunctionError(
        f"{role} {name!r} is a {kind} convolution (groups={module.groups}): each group reads "
        "only its own channels, so the kept channels cannot stand in for the others through it; "
        "grouped and depthwise convolutions are not supported"
    )


def conv_junction(
    model: nn.Module,
    target: str,
    consumer: str | None = None,
    *,
    example: Any = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
) -> Junction | None:
    """The conv junction of ``target``, or ``None`` when ``target`` names no conv.

    ``"<conv>"`` names the conv's output channels; ``"<conv>:in"`` the input channels of a conv
    consumer (the same junction, found from its producer by tracing). The caller checks that the
    layers are not shared. With an ``example`` input, a
    :class:`~lightning_neuronprune.structure.conv_probe.ConvProbe` decides (it reaches models that
    do not trace) and must agree with tracing where the model traces.

    Raises:
        JunctionError: the junction is refused (see the module docstring), or ``consumer`` is
            not the traced one.
        UndecidedJunctionError: tracing cannot decide (untraceable model, unknown module on the
            path).
    """
    modules = dict(model.named_modules())
    if target.endswith(INPUT_SUFFIX):
        name = target[: -len(INPUT_SUFFIX)]
        if not isinstance(modules.get(name), CONV_LAYERS):
            return None
        producer = traced_conv_producer(model, name)
        if producer is None:
            raise JunctionError(
                f"no conv feeds the input channels of {name!r} through per-channel maps; the "
                "input channels of a conv can only be reduced with its producer's output channels"
            )
        junction = conv_junction(model, producer, name)
        return dataclasses.replace(junction, target=target)  # type: ignore[type-var]
    prod = modules.get(target)
    if not isinstance(prod, CONV_LAYERS):
        return None
    if prod.groups > 1:
        raise _grouped(target, prod, "producer")
    if example is not None:
        found, bn, path = _probed(model, target, example, call)
    else:
        traced = traced_conv_consumer(model, target)
        if traced is None:
            raise UndecidedJunctionError(
                f"could not find the consumer of conv {target!r}: the model could not be traced "
                "with torch.fx; give an example batch (`example=`) to find it by probing"
            )
        found, bn, path = traced
    if consumer is not None and consumer != found:
        raise JunctionError(
            f"the consumer of {target!r} is {found!r}, not the given consumer {consumer!r}"
        )
    n = prod.out_channels
    cons = modules[found]
    if isinstance(cons, CONV_LAYERS):
        if cons.groups > 1:
            raise _grouped(found, cons, "consumer")
        width, fits = cons.in_channels, cons.in_channels == n
    elif isinstance(cons, GatheredLinear):
        raise JunctionError(
            f"consumer {found!r} of {target!r} already gathers its input features; reduce "
            f"{target!r} before {found + INPUT_SUFFIX!r}, not after"
        )
    else:
        width, fits = cons.in_features, cons.in_features % n == 0
    if not fits:
        raise JunctionError(
            f"consumer {found!r} reads {width} features, which are not the flattened {n} "
            f"channels of {target!r}"
        )
    if bn is not None and modules[bn].num_features != n:
        raise JunctionError(f"batch norm {bn!r} does not have the {n} channels of {target!r}")
    return Junction(target, "conv", target, found, bn, n, path)


def _probed(
    model: nn.Module, producer: str, example: Any, call: Callable[[nn.Module, Any], Any] | None
) -> tuple[str, str | None, tuple[str, ...]]:
    """The probe decides where tracing cannot; a successful trace must agree with it, and a
    refusal that tracing proves on the code (residual stream, concatenation...) stands."""
    try:
        traced = traced_conv_consumer(model, producer)
    except UndecidedJunctionError:  # the probe may accept what tracing cannot prove
        traced = None
    found = ConvProbe(model, example, call=call).find(producer)
    if traced is not None and traced[:2] != found[:2]:
        raise JunctionError(
            f"tracing and probing disagree on {producer!r}: the traced code gives consumer "
            f"{traced[0]!r} (batch norm {traced[1]!r}), the probe {found[0]!r} (batch norm "
            f"{found[1]!r})"
        )
    return traced if traced is not None else found
