"""Repeated blocks decided once: the verdicts of identical blocks are shared.

A deep model repeats one block (a decoder layer) L times. :class:`RepeatedBlocks` keys each
layer by the ``ModuleList``/``Sequential`` that holds its block, the block's structure (module
names, types, settings and tensor shapes) and the layer's name inside the block. The first layer
of a key is decided by the caller (probed or traced); every later one gets the same verdict: the
junction moved into its block (and checked there by structure), or the same refusal. A junction
that leaves its block is not reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.tracing import TracedJunction

__all__ = ["RepeatedBlocks", "block_signature", "moved_junction", "repeated_block"]


def repeated_block(model: nn.Module, name: str) -> tuple[str, str] | None:
    """``("model.layers.3", "mlp.gate_proj")`` for a layer inside an element of a
    ``ModuleList``/``Sequential`` of blocks (the outermost one), or ``None``."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        parent = model.get_submodule(".".join(parts[:i]))
        if parts[i].isdigit() and isinstance(parent, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return None


def block_signature(block: nn.Module) -> tuple[Any, ...]:
    """Module names, types, settings and tensor shapes: equal for identical repeated blocks."""
    return tuple(
        (
            name,
            type(m).__module__,
            type(m).__qualname__,
            m.extra_repr(),
            tuple(
                (k, tuple(t.shape), t.dtype)
                for k, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
            ),
        )
        for name, m in block.named_modules()
    )


def moved_junction(junction: Junction, source: str, block: str) -> TracedJunction | None:
    """``junction`` of the block ``source`` with its names moved into ``block`` (``None`` when a
    module of it lies outside ``source``)."""

    def move(name: str) -> str:
        return block + name[len(source) :]

    if not all(name.startswith(source + ".") for name in junction.modules):
        return None
    return TracedJunction(
        move(junction.consumer),
        move(junction.batchnorm) if junction.batchnorm is not None else None,
        junction.path,
        tuple(move(p) for p in junction.producers),
        junction.fused,
    )


class RepeatedBlocks:
    """The verdicts of one model's repeated blocks, shared between identical blocks.

    Args:
        model: the network.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._signatures: dict[str, tuple[Any, ...]] = {}
        self._verdicts: dict[tuple[Any, ...], tuple[str, Junction | JunctionError]] = {}

    def _key(self, name: str) -> tuple[str, tuple[Any, ...]] | None:
        block = repeated_block(self.model, name)
        if block is None:
            return None
        prefix, rel = block
        if prefix not in self._signatures:
            self._signatures[prefix] = block_signature(self.model.get_submodule(prefix))
        return prefix, (prefix.rpartition(".")[0], self._signatures[prefix], rel)

    def decide(
        self,
        name: str,
        find: Callable[[str], Junction],
        check: Callable[[str, TracedJunction], Junction],
    ) -> Junction:
        """The junction of the layer ``name``: from an identical earlier block (``check``
        verifies the moved junction by structure), else ``find(name)``, remembered.

        Raises:
            JunctionError: ``find`` refused the layer, here or in an identical earlier block.
        """
        keyed = self._key(name)
        if keyed is None:
            return find(name)
        prefix, key = keyed
        if key in self._verdicts:
            source, verdict = self._verdicts[key]
            if isinstance(verdict, JunctionError):
                raise type(verdict)(f"as in the identical block {source!r}: {verdict}")
            moved = moved_junction(verdict, source, prefix)
            if moved is not None:
                return check(name, moved)
        try:
            junction = find(name)
        except JunctionError as err:
            self._verdicts.setdefault(key, (prefix, err))
            raise
        self._verdicts.setdefault(key, (prefix, junction))
        return junction
