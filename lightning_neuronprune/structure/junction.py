"""What a junction is: the data that names where features are kept, and the layer look-ups
that every stage shares.

A :class:`Junction` is where a producer's outputs reach a consumer's inputs one to one. Keeping p
of its n features deletes producer rows (``kind="producer"``) or, where there is no producer row
to delete, gathers the kept inputs in front of the consumer (``kind="gather"``). A
``kind="conv"`` junction keeps p of a conv producer's n output channels
(:mod:`lightning_neuronprune.structure.conv`). Junctions are
found by :mod:`lightning_neuronprune.structure.discovery` and reduced by
:mod:`lightning_neuronprune.structure.surgery`.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn

from lightning_neuronprune.errors import JunctionError

__all__ = ["INPUT_SUFFIX", "Junction", "Kind", "get_linear", "linear_layer_names"]

INPUT_SUFFIX = ":in"

Kind = Literal["producer", "gather", "conv"]


@dataclass(frozen=True)
class Junction:
    """Where p of n features are kept.

    Attributes:
        target: the name the user gave.
        kind: ``"producer"`` (rows of ``producer`` are deleted), ``"gather"``, or ``"conv"``
            (output channels of a conv ``producer`` are deleted; the consumer is a conv, or an
            ``nn.Linear`` that reads the flattened channels).
        producer: qualified name of the producer ``nn.Linear`` (a conv for ``"conv"``), or
            ``None`` for a gather junction.
        consumer: qualified name of the consumer ``nn.Linear`` (or conv).
        batchnorm: qualified name of a ``BatchNorm1d`` between the two (``BatchNorm2d`` after a
            ``Conv2d``), or ``None``.
        num_features: n (channels for ``"conv"``).
        path: what lies between producer and consumer, for messages.
    """

    target: str
    kind: Kind
    producer: str | None
    consumer: str
    batchnorm: str | None
    num_features: int
    path: tuple[str, ...] = ()

    @property
    def layer(self) -> str:
        """The canonical name: the producer, or ``"<consumer>:in"``."""
        return self.producer if self.producer is not None else self.consumer + INPUT_SUFFIX

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
