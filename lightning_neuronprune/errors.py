"""Exception and warning types raised by :mod:`lightning_neuronprune`."""

from __future__ import annotations

__all__ = [
    "CheckpointMismatchError",
    "JunctionError",
    "NeuronEliminationError",
    "NumericalWarning",
    "StatisticsError",
    "UndecidedJunctionError",
    "UnsupportedLayerError",
]


class NeuronEliminationError(RuntimeError):
    """Base class of every error this package raises at run time."""


class CheckpointMismatchError(NeuronEliminationError, ValueError):
    """A state dict and a model disagree on the neuron elimination.

    One is reduced and the other is not, or they were reduced differently. The message names the
    layer, both shapes and the call to use instead.
    """


class JunctionError(NeuronEliminationError, ValueError):
    """A target layer cannot be simplified: its junction is missing, shared or feature-mixing."""


class UndecidedJunctionError(JunctionError):
    """Tracing could not decide the junction (the model cannot be traced, or the path holds a
    module or an op that no list marks as elementwise); a behavioural probe
    (:class:`~lightning_neuronprune.structure.probe.JunctionProbe`) may still find it."""


class StatisticsError(NeuronEliminationError):
    """Activation statistics are missing, empty or not finite."""


class UnsupportedLayerError(NeuronEliminationError, TypeError):
    """The energy model met a layer with parameters and no counting rule."""


class NumericalWarning(UserWarning):
    """A numerically fragile situation (rank deficiency, ill-conditioning) was handled."""
