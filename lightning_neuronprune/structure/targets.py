"""Resolving the user's targets to junctions, with one mapping of their names.

A junction has three names: the ``target`` the user gave (``"fc2:in"`` or ``"fc1"``), its
canonical ``layer`` (the producer whose neurons are removed, ``"fc1"``, or ``"<consumer>:in"``
when there is no producer) and its ``consumer`` (where statistics are recorded). A gated FFN's
junction is named by its first producer in module order (``"model.layers.0.mlp.gate_proj"``,
Phi-3's ``"...mlp.gate_up_proj"``, T5's ``"...DenseReluDense.wi_0"``) and answers to each of its
producers and to ``"<down_proj>:in"`` where tracing finds the producers. The mapping is
made once, when the junctions are resolved; everything downstream speaks canonical layer names.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn

from lightning_neuronprune.core.batches import call_model
from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.structure.discovery import (
    Junction,
    auto_conv_junctions,
    auto_junctions,
    find_junctions,
    linear_layer_names,
)
from lightning_neuronprune.structure.probe import JunctionProbe

__all__ = ["Targets", "resolve_targets", "traced_targets"]

log = logging.getLogger(__name__)


class Targets(Sequence[Junction]):
    """The resolved junctions, in the given order, looked up by any of their names.

    Args:
        junctions: distinct junctions (no two with the same consumer).
        undecided: ``nn.Linear`` layers that tracing could not decide (``targets="auto"``
            without a probe): a probe may add their junctions.

    Raises:
        JunctionError: two targets name the same junction.

    Example:
        >>> from lightning_neuronprune.structure.discovery import find_junction
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> targets = Targets([find_junction(net, "2:in")])
        >>> targets.layer("2:in"), targets["0"].consumer
        ('0', '2')
    """

    def __init__(self, junctions: Iterable[Junction], undecided: Iterable[str] = ()) -> None:
        self._junctions = tuple(junctions)
        self.undecided = list(undecided)
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
        for j in self._junctions:  # a gated junction answers to each of its producers
            for name in j.producers:
                self._by_name.setdefault(name, j)

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


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str] | Mapping[str, str] = "auto",
    *,
    example: Any = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Targets:
    """Find the junction of every target of ``model``.

    Args:
        model: the network.
        targets: ``"auto"`` (every ``nn.Linear`` whose output neurons, and every conv whose
            output channels, have a consumer (convs found by tracing); layers that cannot be
            simplified are skipped), target names, or a mapping
            ``{target: consumer}`` that names the consumers too (checked by the probe).
        example: one model input (a few samples, on the model's device). With it a
            :class:`~lightning_neuronprune.structure.probe.JunctionProbe` decides the junctions that
            tracing cannot (untraceable ``forward``, custom activation modules) and cross-checks
            the trace where the model traces; without it, tracing alone decides.
        forward_context: a context-manager factory entered around the probe's forward passes
            (e.g. the precision plugin's ``forward_context``).

    Raises:
        JunctionError: a named target cannot be simplified, two name the same junction, or
            ``"auto"`` finds none. :class:`~lightning_neuronprune.errors.UndecidedJunctionError`
            (a subclass) when tracing alone cannot decide a named target and no example is
            given (``"auto"`` lists such layers in :attr:`Targets.undecided` instead).
    """
    probe = None
    if example is not None:
        context = forward_context or nullcontext

        def call(module: nn.Module, x: Any) -> Any:
            with context():
                return call_model(module, x)

        probe = JunctionProbe(model, example, call=call, context=context)
    if targets == "auto":
        undecided: list[str] = []
        junctions = auto_junctions(model, probe=probe, undecided=undecided)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        junctions = sorted(  # with the conv junctions (by tracing), in module order
            [*junctions, *auto_conv_junctions(model)], key=lambda j: order[j.consumer]
        )
        if undecided:
            log.debug("auto targets: %s undecided by tracing", undecided)
            return Targets(junctions, undecided)
        if not junctions:
            raise JunctionError(
                "`targets='auto'` found no nn.Linear or conv with a consumer in "
                f"{type(model).__name__}; "
                f"Linear layers: {linear_layer_names(model)}"
            )
        return Targets(junctions)
    consumers = dict(targets) if isinstance(targets, Mapping) else {}
    return Targets(find_junctions(model, list(targets), consumers, probe=probe))


def traced_targets(
    model: nn.Module, targets: str | Sequence[str] | Mapping[str, str] = "auto"
) -> Targets:
    """The targets as far as tracing alone decides them, before any data is seen.

    What tracing refuses is refused at once (:class:`~lightning_neuronprune.errors.JunctionError`),
    so that a bad target fails before training. When tracing cannot decide a named target (an
    untraceable ``forward``, a custom activation module), the result is empty and the probe
    decides on the first batch (:func:`resolve_targets` with ``example``). Warnings about
    explicit consumers that tracing does not see are silenced: the probe checks them.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return resolve_targets(model, targets)
    except UndecidedJunctionError as err:
        log.debug("targets left to the probe: %s", err)
        return Targets([])
