"""How the search reports progress without knowing who draws it.

The search calls ``progress(description, total, unit)`` for a context manager that yields a
:class:`Bar`; the default, :func:`no_progress`, draws nothing. The Lightning shell passes a factory
of :class:`~lightning_neuronprune.lightning.progress.ProgressBar`, drawn like the Trainer's bar.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

__all__ = ["Bar", "no_progress"]


class Bar(Protocol):
    """What the search asks of a progress bar: ``update`` to an absolute count, ``advance`` by a
    number of steps."""

    def update(self, done: int) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class _NoBar:
    def update(self, done: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


def no_progress(description: str, total: int | None, unit: str) -> AbstractContextManager[Bar]:
    """The core's default progress: no bar."""
    return nullcontext(_NoBar())
