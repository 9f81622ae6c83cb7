"""What a junction is: the data that names where features are kept, and the layer look-ups
that every stage shares.

A :class:`Junction` is where a producer's outputs reach a consumer's inputs one to one. Keeping p
of its n features deletes producer rows (``kind="producer"``); in a gated FFN it deletes row j of
every producer whose outputs are combined elementwise before the consumer (``kind="gated"``:
SwiGLU/GeGLU ``down(act(gate(x)) * up(x))``, T5's ``wi_0``/``wi_1`` → ``wo``, or one fused
``gate_up_proj`` of 2n outputs split in halves, whose rows j and n + j go together); where there
is no producer row to delete, it gathers the kept inputs in front of the consumer
(``kind="gather"``). A ``kind="conv"`` junction keeps p of a conv producer's n output channels
(:mod:`lightning_neuronprune.structure.conv`). Junctions are
found by :mod:`lightning_neuronprune.structure.discovery` and reduced by
:mod:`lightning_neuronprune.structure.surgery`.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_neuronprune.errors import JunctionError

__all__ = ["INPUT_SUFFIX", "Junction", "Kind", "get_linear", "linear_layer_names"]

INPUT_SUFFIX = ":in"

Kind = Literal["producer", "gather", "gated", "conv"]


@dataclass(frozen=True)
class Junction:
    """Where p of n features are kept.

    Attributes:
        target: the name the user gave.
        kind: ``"producer"`` (rows of ``producer`` are deleted), ``"gated"`` (rows of every
            producer in ``producers`` are deleted), ``"gather"``, or ``"conv"`` (output channels
            of a conv ``producer`` are deleted; the consumer is a conv, or an ``nn.Linear`` that
            reads the flattened channels).
        producer: qualified name of the producer ``nn.Linear`` (a conv for ``"conv"``; of a gated
            junction: the first of ``producers``, the gate, which names the junction), or
            ``None`` for a gather junction.
        consumer: qualified name of the consumer ``nn.Linear`` (or conv).
        batchnorm: qualified name of a ``BatchNorm1d`` between the two (``BatchNorm2d`` after a
            ``Conv2d``), or ``None``.
        num_features: n, the consumer's input features (channels for ``"conv"``).
        path: what lies between producer and consumer, for messages.
        producers: every producer whose rows are deleted, ``producer`` first: ``(producer,)``
            for ``kind="producer"``, e.g. ``("mlp.gate_proj", "mlp.up_proj")`` for a gated one,
            ``()`` for a gather junction. Filled in from ``producer`` when not given.
        fused: a gated junction with one producer of 2n outputs whose halves are combined
            (Phi-3's ``gate_up_proj``): keeping feature j keeps its rows j and n + j.

    Raises:
        JunctionError: the fields contradict each other (e.g. a gated junction with one unfused
            producer, or a fused producer that is not one).
    """

    target: str
    kind: Kind
    producer: str | None
    consumer: str
    batchnorm: str | None
    num_features: int
    path: tuple[str, ...] = ()
    producers: tuple[str, ...] = ()
    fused: bool = False

    def __post_init__(self) -> None:
        producers = tuple(self.producers)
        if not producers and self.producer is not None:
            producers = (self.producer,)
        object.__setattr__(self, "producers", producers)
        if self.kind == "gather":
            bad = self.producer is not None or producers or self.fused
        elif self.kind in ("producer", "conv"):
            bad = producers != (self.producer,) or self.fused
        elif self.kind == "gated":
            bad = (
                not producers
                or producers[0] != self.producer
                or len(set(producers)) != len(producers)
                or (len(producers) != 1 if self.fused else len(producers) < 2)
                or self.batchnorm is not None
            )
        else:
            raise JunctionError(f"unknown junction kind {self.kind!r}")
        if bad:
            raise JunctionError(
                f"inconsistent {self.kind} junction for consumer {self.consumer!r}: producer "
                f"{self.producer!r}, producers {producers}, fused={self.fused}, batch norm "
                f"{self.batchnorm!r} (a gated junction has two or more producers, or one fused "
                "producer, and no batch norm)"
            )

    @property
    def layer(self) -> str:
        """The canonical name: the producer (a gated junction's first producer), or
        ``"<consumer>:in"``."""
        return self.producer if self.producer is not None else self.consumer + INPUT_SUFFIX

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module a reduction replaces: the producers, the batch norm, the consumer."""
        return (*self.producers, *filter(None, [self.batchnorm]), self.consumer)

    def producer_rows(self, kept: Tensor) -> Tensor:
        """The producer rows that keeping the features ``kept`` keeps: ``kept`` itself, or for a
        fused producer of 2n outputs ``[kept, n + kept]``."""
        if self.fused:
            return torch.cat([kept, kept + self.num_features])
        return kept

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _unknown(model: nn.Module, name: str) -> JunctionError:
    valid = linear_layer_names(model)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return JunctionError(
        f"the model has no nn.Linear named {name!r}.{hint} Valid names: {valid} (append "
        f"{INPUT_SUFFIX!r} to target a layer's input features)"
    )


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` named ``name`` in ``model``, or a :class:`JunctionError` naming the
    valid names (and the closest one)."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise _unknown(model, name)
    module = modules[name]
    if not isinstance(module, nn.Linear):
        raise JunctionError(
            f"layer {name!r} is a {type(module).__name__}, not an nn.Linear; only the neurons of "
            f"nn.Linear layers can be eliminated. Valid names: {linear_layer_names(model)}"
        )
    return module
