"""Probe passes at block scope: one block of a deep model run alone on its recorded inputs.

A decoder of L identical blocks costs L times one block per forward pass. The behavioural probe
(:mod:`~lightning_neuronprune.structure.probe`) decides a producer inside a block by running only
that block: the probe's full baseline pass records the positional and keyword arguments of the
first block of each kind (:func:`first_blocks`: the elements of a ``ModuleList``/``Sequential``
with the same structure, as in :mod:`~lightning_neuronprune.structure.blocks`), with a forward
pre-hook, and its output. A :class:`BlockScope` then replays the block on fresh copies of those
arguments, so that a block pass costs about 1/L of a full forward.

Copies are deep (a key/value cache passed to the block is copied and written anew by each
replay); the model's own modules, parameters and buffers are never copied. What the block can
change outside its output is its arguments: :func:`state_tensors` lists every tensor reachable
from them (through tuples, lists, dicts and objects' attributes), so that a probe pass can tell
whether a perturbation left the block, by its output or by its arguments.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from lightning_neuronprune.structure.blocks import block_signature, repeated_block
from lightning_neuronprune.structure.junction import linear_layer_names
from lightning_neuronprune.structure.perturbation import Trace

log = logging.getLogger(__name__)

__all__ = ["BlockRecorder", "BlockScope", "first_blocks", "shared_copy", "state_tensors"]

#: How deep :func:`state_tensors` looks into nested objects.
MAX_DEPTH = 6


def first_blocks(model: nn.Module) -> dict[str, float]:
    """``{block: 1/L}``: the first block of each kind that holds an ``nn.Linear`` (an element of
    a ``ModuleList``/``Sequential`` of L elements; blocks of the same container and structure are
    one kind), in module order."""
    seen: set[tuple[Any, ...]] = set()
    found: dict[str, float] = {}
    for name in linear_layer_names(model):
        block = repeated_block(model, name)
        if block is None or block[0] in found:
            continue
        prefix = block[0]
        parent = prefix.rpartition(".")[0]
        key = (parent, block_signature(model.get_submodule(prefix)))
        if key not in seen:
            seen.add(key)
            found[prefix] = 1.0 / len(model.get_submodule(parent))
    return found


def state_tensors(value: Any) -> list[Tensor]:
    """Every tensor reachable from ``value`` (tensors, tuples, lists, dicts and the attributes
    of other objects, :data:`MAX_DEPTH` levels deep), each once, in a fixed order; modules are
    not entered."""
    seen: set[int] = set()
    return list(_walk(value, seen, 0))


def _walk(value: Any, seen: set[int], depth: int) -> Iterator[Tensor]:
    if id(value) in seen or depth > MAX_DEPTH or isinstance(value, (nn.Module, type)):
        return
    seen.add(id(value))
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _walk(v, seen, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk(v, seen, depth + 1)
    elif hasattr(value, "__dict__") and not callable(value):
        for v in vars(value).values():
            yield from _walk(v, seen, depth + 1)


def shared_copy(model: nn.Module, value: Any) -> Any:
    """A deep copy of ``value`` that shares ``model``'s modules, parameters and buffers."""
    memo: dict[int, Any] = {id(m): m for m in model.modules()}
    memo.update((id(t), t) for t in model.parameters())
    memo.update((id(t), t) for t in model.buffers())
    return copy.deepcopy(value, memo)


class BlockRecorder:
    """Records the arguments and the output of some blocks during one forward pass.

    Args:
        model: the network.
        shares: ``{block: share}``, the blocks to record (:func:`first_blocks`).
    """

    def __init__(self, model: nn.Module, shares: dict[str, float]) -> None:
        self.model = model
        self.shares = shares
        self.calls: dict[str, int] = {}
        self.args: dict[str, tuple[tuple[Any, ...], dict[str, Any]] | None] = {}
        self.outputs: dict[str, list[Tensor]] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks on the blocks while the pass runs (removed afterwards, also on error)."""
        handles = []
        try:
            for name in self.shares:
                block = self.model.get_submodule(name)
                handles.append(block.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                handles.append(block.register_forward_hook(self._post(name)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            try:  # copied before the block runs: it may write into its arguments
                self.args[name] = shared_copy(self.model, (args, kwargs))
            except Exception as err:  # an argument that cannot be copied: no block scope
                log.debug("block %s: arguments not copied (%s)", name, err)
                self.args[name] = None

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.outputs[name] = [t.detach().clone() for t in state_tensors(output)]

        return hook

    def scope(self, name: str) -> BlockScope | None:
        """The recorded block ``name`` as a :class:`BlockScope`, or ``None`` when it was not
        recorded, ran more than once, or its arguments could not be copied."""
        args = self.args.get(name)
        if self.calls.get(name) != 1 or args is None:
            return None
        return BlockScope(self.model, name, self.shares[name], args, self.outputs[name])


class BlockScope:
    """One block and the arguments it was called with in the probe's full baseline pass.

    Args:
        model: the network that holds the block.
        name: the block's qualified name.
        share: its cost as a fraction of a full forward (1/L for L blocks).
        args: the positional and keyword arguments ``(args, kwargs)`` as recorded (copied
            before the block ran).
        output: the tensors of the block's output in the full baseline pass.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        share: float,
        args: tuple[tuple[Any, ...], dict[str, Any]],
        output: list[Tensor],
    ) -> None:
        self.model = model
        self.name = name
        self.module = model.get_submodule(name)
        self.share = share
        self.args = args
        self.output = output
        #: the block's own baseline pass (set by the probe once it matches the full one)
        self.baseline: Trace | None = None

    def replay(self) -> tuple[Any, list[Tensor]]:
        """Run the block on fresh copies of its arguments; its output and
        :func:`state_tensors` of the arguments afterwards."""
        args, kwargs = shared_copy(self.model, self.args)
        out = self.module(*args, **kwargs)
        return out, state_tensors((args, kwargs))
