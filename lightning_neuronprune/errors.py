"""Exception and warning types raised by :mod:`lightning_neuronprune`."""

from __future__ import annotations

__all__ = [
    "JunctionError",
    "NeuronEliminationError",
    "NumericalWarning",
    "StatisticsError",
    "UnsupportedLayerError",
]


class NeuronEliminationError(RuntimeError):
    """Base class of every error this package raises at run time."""


class JunctionError(NeuronEliminationError, ValueError):
    """A target layer cannot be simplified: its junction is missing, shared or feature-mixing."""


class StatisticsError(NeuronEliminationError):
    """Activation statistics are missing, empty or not finite."""


class UnsupportedLayerError(NeuronEliminationError, TypeError):
    """The energy model met a layer with parameters and no counting rule."""


class NumericalWarning(UserWarning):
    """A numerically fragile situation (rank deficiency, ill-conditioning) was handled."""
