"""Progress bars for the work after training, in the style of the Trainer's own progress bar.

The functional core only calls plain callables (``on_point``, ``progress``); this module turns
them into a bar drawn the way ``trainer.progress_bar_callback`` draws: with tqdm for
``TQDMProgressBar`` (and custom bars), with rich for ``RichProgressBar``. Nothing is drawn when
the Trainer's progress bar is disabled, nor on ranks other than zero.
"""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl

__all__ = ["ProgressBar", "sample_count"]


class ProgressBar:
    """One bar: counts, elapsed time and an ETA when the total is known.

    Args:
        trainer: whose progress-bar style to follow.
        description: the text in front of the bar.
        total: the number of steps, or ``None`` when unknown (counts only).
        unit: what a step is (``"samples"``, ``"points"``).

    Example::

        with ProgressBar(trainer, "statistics", total=60_000, unit="samples") as bar:
            collect_statistics(model, consumers, data, progress=bar.update)
    """

    def __init__(
        self, trainer: pl.Trainer, description: str, total: int | None = None, unit: str = "it"
    ) -> None:
        self.done = 0
        self._tqdm: Any = None
        self._rich: Any = None
        self._own_rich = False
        self._task: Any = None
        style = getattr(trainer, "progress_bar_callback", None)
        if style is None or style.is_disabled or not trainer.is_global_zero:
            return
        from pytorch_lightning.callbacks import RichProgressBar

        if isinstance(style, RichProgressBar):
            self._start_rich(style, description, total)
        else:
            from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar

            self._tqdm = Tqdm(
                desc=description, total=total, unit=unit, leave=True, dynamic_ncols=True,
                file=sys.stdout, smoothing=0, bar_format=TQDMProgressBar.BAR_FORMAT,
            )  # fmt: skip

    def _start_rich(self, style: Any, description: str, total: int | None) -> None:
        progress = getattr(style, "progress", None)
        if progress is None or getattr(style, "_progress_stopped", True):
            # the Trainer's live display is closed: open one with the same kind of columns
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            progress = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            )  # fmt: skip
            progress.start()
            self._own_rich = True
        elif total is None:
            total = float("inf")  # how the Trainer's rich bar marks an unknown total ("--")
        self._rich = progress
        self._task = progress.add_task(description, total=total)

    @property
    def enabled(self) -> bool:
        """Whether a bar is drawn."""
        return self._tqdm is not None or self._rich is not None

    def update(self, done: int) -> None:
        """Move the bar to ``done`` steps (absolute, not an increment)."""
        step, self.done = done - self.done, done
        if self._tqdm is not None:
            self._tqdm.update(step)
        elif self._rich is not None:
            self._rich.update(self._task, completed=done)

    def advance(self, steps: int = 1) -> None:
        """Move the bar on by ``steps``."""
        self.update(self.done + steps)

    def close(self) -> None:
        """Finish the bar (it stays on screen)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        elif self._rich is not None:
            if self._own_rich:
                self._rich.stop()
            else:
                self._rich.refresh()
            self._rich = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sample_count(loader: Any, max_samples: int | None = None) -> int | None:
    """The samples (per process) a pass over ``loader`` sees, capped at ``max_samples``; ``None``
    when the loader's sampler or dataset has no length."""
    n = None
    for source in (getattr(loader, "sampler", None), getattr(loader, "dataset", None), loader):
        try:
            n = len(source)  # type: ignore[arg-type]
        except TypeError:
            continue
        if source is loader and getattr(loader, "batch_size", None):
            n *= loader.batch_size  # batches, not samples
        break
    if n is None:
        return max_samples
    return n if max_samples is None else min(n, max_samples)
