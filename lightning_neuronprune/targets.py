"""Resolving the user's targets to junctions, with one mapping of their names.

A junction has three names: the ``target`` the user gave (``"fc2:in"`` or ``"fc1"``), its
canonical ``layer`` (the producer whose neurons are removed, ``"fc1"``, or ``"<consumer>:in"``
when there is no producer) and its ``consumer`` (where statistics are recorded). The mapping is
made once, when the junctions are resolved; everything downstream speaks canonical layer names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

from torch import nn

from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.surgery import Junction, find_junction, linear_layer_names

__all__ = ["Targets", "resolve_targets"]

log = logging.getLogger(__name__)


class Targets(Sequence[Junction]):
    """The resolved junctions, in the given order, looked up by any of their names.

    Args:
        junctions: distinct junctions (no two with the same consumer).

    Raises:
        JunctionError: two targets name the same junction.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> targets = Targets([find_junction(net, "2:in")])
        >>> targets.layer("2:in"), targets["0"].consumer
        ('0', '2')
    """

    def __init__(self, junctions: Iterable[Junction]) -> None:
        self._junctions = tuple(junctions)
        self.by_consumer: dict[str, Junction] = {}
        self._by_name: dict[str, Junction] = {}
        for j in self._junctions:
            if j.consumer in self.by_consumer:
                raise JunctionError(
                    f"targets {self.by_consumer[j.consumer].target!r} and {j.target!r} name the "
                    f"same junction (consumer {j.consumer!r})"
                )
            self.by_consumer[j.consumer] = j
        for j in self._junctions:
            self._by_name[j.layer] = j
        for j in self._junctions:
            self._by_name.setdefault(j.target, j)

    def __len__(self) -> int:
        return len(self._junctions)

    def __iter__(self) -> Iterator[Junction]:
        return iter(self._junctions)

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        """A junction by position, or by target or canonical layer name."""
        if isinstance(key, (int, slice)):
            return self._junctions[key]
        try:
            return self._by_name[key]
        except KeyError:
            raise JunctionError(f"{key!r} is not among the targets {self.names}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._by_name or key in self._junctions

    @property
    def names(self) -> list[str]:
        """Every name a junction answers to, sorted."""
        return sorted(self._by_name)

    @property
    def layers(self) -> list[str]:
        """The canonical layer names, in order."""
        return [j.layer for j in self._junctions]

    def layer(self, name: str) -> str:
        """The canonical layer name of a target or layer name."""
        return self[name].layer

    def canonical(self, names: Iterable[str], what: str) -> list[str]:
        """Translate names to canonical layer names; ``what`` names the argument in errors."""
        names = list(names)
        unknown = [n for n in names if n not in self._by_name]
        if unknown:
            raise JunctionError(
                f"{what} names {unknown}, which are not among the targets {self.names}"
            )
        return [self._by_name[n].layer for n in names]


def resolve_targets(model: nn.Module, targets: str | Sequence[str] = "auto") -> Targets:
    """Find the junction of every target of ``model``.

    Args:
        model: the network.
        targets: ``"auto"`` (every ``nn.Linear`` whose output neurons have a consumer; layers
            that cannot be simplified are skipped) or target names.

    Raises:
        JunctionError: a named target cannot be simplified, two name the same junction, or
            ``"auto"`` finds none.
    """
    if targets == "auto":
        junctions = []
        for name in linear_layer_names(model):
            try:
                junctions.append(find_junction(model, name))
            except JunctionError as err:
                log.debug("auto targets: skipping %s (%s)", name, err)
        if not junctions:
            raise JunctionError(
                f"`targets='auto'` found no nn.Linear with a consumer in {type(model).__name__}; "
                f"Linear layers: {linear_layer_names(model)}"
            )
        return Targets(junctions)
    return Targets(find_junction(model, t) for t in targets)
