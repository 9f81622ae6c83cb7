"""Finding a junction's consumer (or producer) by tracing the model with :mod:`torch.fx`.

The structural half of junction finding: :func:`traced_consumer` traces the modules enclosing a
producer ``nn.Linear``, innermost first, and follows the producer's output through elementwise
modules, functions and methods (the ``ELEMENTWISE_*`` lists) and at most one ``BatchNorm1d`` to
the consumer ``nn.Linear``; :func:`traced_producer` walks back from a consumer. Anything else on
the path (a feature mix, several users, a secondary argument) refuses the junction. The
behavioural half is :mod:`lightning_neuronprune.structure.probe`, and
:mod:`lightning_neuronprune.structure.discovery` combines the two into a
:class:`~lightning_neuronprune.structure.junction.Junction`. :class:`LeafTracer` is also the
tracer of the
cached evaluator (:mod:`lightning_neuronprune.search.evaluation`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.structure.modules import GatheredLinear

__all__ = [
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS",
    "ELEMENTWISE_MODULES",
    "LeafTracer",
    "traced_consumer",
    "traced_producer",
]

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.SiLU, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Dropout, nn.AlphaDropout, nn.Identity, nn.Flatten,
)  # fmt: skip
ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, torch.tanh, F.tanh, torch.sigmoid,
    F.sigmoid, F.leaky_relu, F.elu, F.selu, F.silu, F.mish, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softplus, F.softsign, F.dropout, F.alpha_dropout, torch.flatten,
})  # fmt: skip
ELEMENTWISE_METHODS: frozenset[str] = frozenset(
    {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "flatten", "contiguous"}
)


class LeafTracer(torch.fx.Tracer):
    """The default tracer, with :class:`~lightning_neuronprune.structure.modules.GatheredLinear`
    kept as a
    leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, GatheredLinear) or super().is_leaf_module(m, module_qualified_name)


def _describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def _is_elementwise(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return False


def _scopes(name: str) -> list[str]:
    """``"a.b.c"`` → ``["a.b", "a", ""]``: the enclosing modules, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _traced_scopes(
    model: nn.Module, name: str
) -> Iterator[tuple[str, torch.fx.Graph, dict[str, nn.Module], str]]:
    """Trace the modules enclosing ``name``, innermost first, skipping untraceable ones.

    Yields:
        ``(scope, graph, modules of the scope, name relative to the scope)``.
    """
    for scope in _scopes(name):
        root = model.get_submodule(scope) if scope else model
        try:
            graph = LeafTracer().trace(root)
        except Exception:  # any tracing failure means "try the enclosing scope"
            continue
        yield scope, graph, dict(root.named_modules()), name[len(scope) + 1 :] if scope else name


def _qualify(scope: str, rel: str) -> str:
    return f"{scope}.{rel}" if scope else rel


class _Outward(Exception):
    """The walk left the traced scope; retry in the enclosing one."""


def _walk_forward(
    graph: torch.fx.Graph, modules: Mapping[str, nn.Module], producer_rel: str, producer: str
) -> tuple[str, str | None, tuple[str, ...]]:
    """From the producer's call, follow single users through elementwise ops to a Linear."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == producer_rel]
    if len(calls) != 1:
        raise JunctionError(
            f"layer {producer!r} is called {len(calls)} times in the forward pass; a layer used "
            "more than once cannot be reduced"
        )
    node, batchnorm, path = calls[0], None, []
    while True:
        users = list(node.users)
        if not users:
            raise JunctionError(f"the output of {producer!r} is never used, so it has no consumer")
        if len(users) > 1:
            raise UndecidedJunctionError(
                f"the output of {producer!r} (after {path or 'nothing'}) feeds "
                f"{len(users)} consumers: {[_describe(u, modules) for u in users]}; a junction "
                "must have exactly one consumer nn.Linear"
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
                f"the output of {producer!r} reaches {_describe(user, modules)} as a secondary "
                "argument; only elementwise ops may lie between producer and consumer"
            )
        if user.op == "call_module":
            m = modules[str(user.target)]
            if isinstance(m, nn.Linear):
                return str(user.target), batchnorm, tuple(path)
            if isinstance(m, nn.BatchNorm1d) and batchnorm is None:
                batchnorm = str(user.target)
                path.append(_describe(user, modules))
                node = user
                continue
        if _is_elementwise(user, modules):
            path.append(_describe(user, modules))
            node = user
            continue
        raise UndecidedJunctionError(
            f"between {producer!r} and its consumer lies {_describe(user, modules)}, which mixes "
            "features or is not known to act elementwise; only elementwise modules (ReLU, GELU, "
            "Tanh, Sigmoid, LeakyReLU, Dropout, Identity, flatten) and one BatchNorm1d may lie "
            "between the two Linear layers"
        )


def _walk_backward(
    graph: torch.fx.Graph, modules: Mapping[str, nn.Module], consumer_rel: str
) -> str | None:
    """The Linear that feeds the consumer through single-user elementwise ops, if any."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == consumer_rel]
    if len(calls) != 1:
        return None
    node = calls[0].args[0] if calls[0].args else None
    while isinstance(node, torch.fx.Node) and len(node.users) == 1:
        if node.op == "call_module":
            m = modules[str(node.target)]
            if isinstance(m, nn.Linear):
                return str(node.target)
            if not isinstance(m, (nn.BatchNorm1d, *ELEMENTWISE_MODULES)):
                return None
        elif not _is_elementwise(node, modules):
            return None
        node = node.args[0] if node.args else None
    return None


def traced_consumer(
    model: nn.Module, producer: str
) -> tuple[str, str | None, tuple[str, ...]] | None:
    """``(consumer, batchnorm, path)`` by :mod:`torch.fx`, or ``None`` if no scope traced.

    Raises:
        JunctionError: the traced code refuses the junction (the output is the network output,
            or feeds several users or a feature-mixing op).
    """
    root_traced = False
    for scope, graph, modules, rel in _traced_scopes(model, producer):
        root_traced = root_traced or scope == ""
        try:
            cons_rel, bn_rel, path = _walk_forward(graph, modules, rel, producer)
        except _Outward:
            continue
        bn = _qualify(scope, bn_rel) if bn_rel is not None else None
        return _qualify(scope, cons_rel), bn, path
    if root_traced:
        raise JunctionError(
            f"could not find the consumer of {producer!r}: its output is the network output"
        )
    return None


def traced_producer(model: nn.Module, consumer: str) -> str | None:
    """The ``nn.Linear`` that feeds ``consumer`` through single-user elementwise ops, found in the
    innermost enclosing module that traces, or ``None``."""
    for scope, graph, modules, rel in _traced_scopes(model, consumer):
        producer = _walk_backward(graph, modules, rel)
        return _qualify(scope, producer) if producer is not None else None
    return None
