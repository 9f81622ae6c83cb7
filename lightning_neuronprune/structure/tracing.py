"""Finding a junction's consumer (or producer) by tracing the model with :mod:`torch.fx`.

The structural half of junction finding: :func:`traced_consumer` traces the modules enclosing a
producer ``nn.Linear``, innermost first, and follows the producer's output through elementwise
modules, functions and methods (the ``ELEMENTWISE_*`` lists) and at most one ``BatchNorm1d`` to
the consumer ``nn.Linear``; :func:`traced_producer` walks back from a consumer. Anything else on
the path (a feature mix, several users, a secondary argument) refuses the junction.

Gated FFNs are followed too (:func:`traced_junction`): a product ``a * b`` on the path whose other
factor comes, through single-use elementwise ops, from another ``nn.Linear`` makes that layer a
second producer (SwiGLU's ``down(act(gate(x)) * up(x))``, T5's ``wi_0``/``wi_1``); a producer
whose output is cut in halves (``chunk(2, dim=-1)``) that are multiplied together is a fused
``gate_up_proj`` (Phi-3). A factor that is read twice, or that comes from anything but an
``nn.Linear`` through elementwise ops, refuses the junction. The
behavioural half is :mod:`lightning_neuronprune.structure.probe`, and
:mod:`lightning_neuronprune.structure.discovery` combines the two into a
:class:`~lightning_neuronprune.structure.junction.Junction`. :class:`LeafTracer` is also the
tracer of the
cached evaluator (:mod:`lightning_neuronprune.search.evaluation`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
    "TracedJunction",
    "traced_consumer",
    "traced_junction",
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


_MUL_FUNCTIONS: frozenset[Any] = frozenset({operator.mul, torch.mul})


@dataclass(frozen=True)
class TracedJunction:
    """What the traced code shows from a producer to its consumer.

    Attributes:
        consumer: qualified name of the consumer ``nn.Linear``.
        batchnorm: a ``BatchNorm1d`` on the path, or ``None``.
        path: the ops between the producer(s) and the consumer, for messages.
        producers: every ``nn.Linear`` whose outputs are combined before the consumer, in module
            order: one for a plain (or fused) junction, several for a gated one.
        fused: the one producer's output is cut in two halves that are multiplied together.
    """

    consumer: str
    batchnorm: str | None
    path: tuple[str, ...]
    producers: tuple[str, ...]
    fused: bool = False

    @property
    def gated(self) -> bool:
        return self.fused or len(self.producers) > 1


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


def _is_mul(node: torch.fx.Node) -> bool:
    return (
        (
            (node.op == "call_function" and node.target in _MUL_FUNCTIONS)
            or (node.op == "call_method" and node.target == "mul")
        )
        and len(node.args) == 2
        and not node.kwargs
    )


def _is_halving(node: torch.fx.Node) -> bool:
    """``x.chunk(2, dim=-1)`` or ``torch.chunk(x, 2, -1)``."""
    if not (
        (node.op == "call_method" and node.target == "chunk")
        or (node.op == "call_function" and node.target is torch.chunk)
    ):
        return False
    chunks = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return chunks == 2 and dim == -1


def _forward_chain(
    node: torch.fx.Node, modules: Mapping[str, nn.Module], path: list[str]
) -> torch.fx.Node:
    """Follow single users through elementwise ops; the last node of the chain."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or not _is_elementwise(user, modules) or user.args[0] is not node:
            return node
        path.append(_describe(user, modules))
        node = user
    return node


def _fused_halves(
    halving: torch.fx.Node, modules: Mapping[str, nn.Module], producer: str, path: list[str]
) -> torch.fx.Node:
    """The product node of a fused producer's two halves, or a :class:`JunctionError`."""
    halves = sorted(halving.users, key=lambda u: str(u.args[1:2]))
    if len(halves) != 2 or any(
        h.op != "call_function" or h.target is not operator.getitem or h.args[1] != i
        for i, h in enumerate(halves)
    ):
        raise JunctionError(
            f"the output of {producer!r} is cut in halves, but the halves are not each used "
            "once; only a fused gate/up producer whose halves are multiplied can be reduced"
        )
    path.append(f"chunk(2) of {producer!r}")
    ends = [_forward_chain(h, modules, path) for h in halves]
    users = [list(e.users) for e in ends]
    mul = users[0][0] if len(users[0]) == 1 else None
    if mul is None or users[1] != [mul] or not _is_mul(mul) or set(mul.args) != set(ends):
        raise JunctionError(
            f"the two halves of {producer!r} are not multiplied together through single-use "
            "elementwise ops; a fused gate/up producer needs act(gate) * up (a gate read twice "
            "cannot be reduced)"
        )
    path.append("mul")
    return mul


def _gate_partner(factor: torch.fx.Node, modules: Mapping[str, nn.Module], producer: str) -> str:
    """The ``nn.Linear`` whose output, through single-use elementwise ops, is ``factor``."""
    node = factor
    while True:
        if len(node.users) != 1:
            raise JunctionError(
                f"the factor multiplied with the output of {producer!r} ("
                f"{_describe(node, modules)}) is read {len(node.users)} times; a gate read "
                "twice cannot be reduced"
            )
        if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Linear):
            return str(node.target)
        if not _is_elementwise(node, modules) or not node.args:
            raise UndecidedJunctionError(
                f"the output of {producer!r} is multiplied with {_describe(node, modules)}, "
                "which does not come from an nn.Linear through elementwise ops; only gated "
                "products of nn.Linear outputs (act(gate(x)) * up(x)) can be reduced"
            )
        arg = node.args[0]
        if not isinstance(arg, torch.fx.Node):
            raise UndecidedJunctionError(
                f"the output of {producer!r} is multiplied with a value that no nn.Linear produces"
            )
        node = arg


def _calls(graph: torch.fx.Graph, rel: str) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_module" and n.target == rel]


def _walk_forward(
    graph: torch.fx.Graph, modules: Mapping[str, nn.Module], producer_rel: str, producer: str
) -> TracedJunction:
    """From the producer's call, follow single users through elementwise ops (and gated
    products) to a Linear. Names in the result are relative to the traced scope."""
    calls = _calls(graph, producer_rel)
    if len(calls) != 1:
        raise JunctionError(
            f"layer {producer!r} is called {len(calls)} times in the forward pass; a layer used "
            "more than once cannot be reduced"
        )
    node, batchnorm, path = calls[0], None, []
    producers, fused = [producer_rel], False
    if len(node.users) == 1 and _is_halving(next(iter(node.users))):
        node, fused = _fused_halves(next(iter(node.users)), modules, producer, path), True
    while True:
        users = list(node.users)
        if not users:
            raise JunctionError(f"the output of {producer!r} is never used, so it has no consumer")
        if len(users) > 1:
            raise UndecidedJunctionError(
                f"the output of {producer!r} (after {path or 'nothing'}) feeds "
                f"{len(users)} consumers: {[_describe(u, modules) for u in users]}; a junction "
                "must have exactly one consumer nn.Linear (and a gate read twice cannot be "
                "reduced)"
            )
        user = users[0]
        if user.op == "output":
            raise _Outward
        if _is_mul(user) and not fused:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, torch.fx.Node):
                partner = _gate_partner(other, modules, producer)
                if partner in producers or len(_calls(graph, partner)) != 1:
                    raise JunctionError(
                        f"the output of {producer!r} is multiplied with that of {partner!r}, "
                        "which runs more than once or is read twice; it cannot be reduced"
                    )
                producers.append(partner)
                path.append(f"mul with {partner}")
            else:
                path.append("mul")
            node = user
            continue
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
                order = {name: i for i, name in enumerate(modules)}
                producers.sort(key=order.__getitem__)
                return TracedJunction(
                    str(user.target), batchnorm, tuple(path), tuple(producers), fused
                )
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
            "Tanh, Sigmoid, LeakyReLU, Dropout, Identity, flatten), gated products of nn.Linear "
            "outputs and one BatchNorm1d may lie between the two Linear layers"
        )


def _walk_backward(
    graph: torch.fx.Graph, modules: Mapping[str, nn.Module], consumer_rel: str
) -> str | None:
    """The Linear that feeds the consumer through single-user elementwise ops, if any."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == consumer_rel]
    if len(calls) != 1:
        return None
    node = calls[0].args[0] if calls[0].args else None
    while isinstance(node, torch.fx.Node) and (len(node.users) == 1 or _is_halving(node)):
        if _is_mul(node) or (
            node.op == "call_function" and node.target is operator.getitem or _is_halving(node)
        ):  # a gated product: the forward walk from the producer checks the rest
            node = node.args[0]
            continue
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


def traced_junction(model: nn.Module, producer: str) -> TracedJunction | None:
    """The junction of ``producer`` by :mod:`torch.fx` (gated ones included), or ``None`` if no
    enclosing scope traced.

    Raises:
        JunctionError: the traced code refuses the junction (the output is the network output,
            or feeds several users or a feature-mixing op; a gate read twice or made by anything
            but an ``nn.Linear``).
    """
    root_traced = False
    for scope, graph, modules, rel in _traced_scopes(model, producer):
        root_traced = root_traced or scope == ""
        try:
            found = _walk_forward(graph, modules, rel, producer)
        except _Outward:
            continue
        bn = _qualify(scope, found.batchnorm) if found.batchnorm is not None else None
        return TracedJunction(
            _qualify(scope, found.consumer),
            bn,
            found.path,
            tuple(_qualify(scope, p) for p in found.producers),
            found.fused,
        )
    if root_traced:
        raise JunctionError(
            f"could not find the consumer of {producer!r}: its output is the network output"
        )
    return None


def traced_consumer(
    model: nn.Module, producer: str
) -> tuple[str, str | None, tuple[str, ...]] | None:
    """``(consumer, batchnorm, path)`` of :func:`traced_junction`, or ``None`` if no scope
    traced."""
    found = traced_junction(model, producer)
    return None if found is None else (found.consumer, found.batchnorm, found.path)


def traced_producer(model: nn.Module, consumer: str) -> str | None:
    """The ``nn.Linear`` that feeds ``consumer`` through single-user elementwise ops, found in the
    innermost enclosing module that traces, or ``None``."""
    for scope, graph, modules, rel in _traced_scopes(model, consumer):
        producer = _walk_backward(graph, modules, rel)
        return _qualify(scope, producer) if producer is not None else None
    return None
