from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from lit_models import BlobsData, LitMLP
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from lightning_neuronprune import NeuronEliminationCallback
from lightning_neuronprune.lightning.progress import ProgressBar, sample_count


def _fit(tmp_path: Path, **kwargs) -> NeuronEliminationCallback:
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks=4, joint="greedy", verbose=False
    )
    options = {
        "max_epochs": 1, "default_root_dir": tmp_path, "enable_model_summary": False,
        "enable_checkpointing": False, "logger": False, "callbacks": [callback],
    }  # fmt: skip
    options.update(kwargs)
    if "callbacks" in kwargs:
        options["callbacks"] = [*kwargs["callbacks"], callback]
    pl.Trainer(**options).fit(LitMLP(), datamodule=BlobsData())
    return callback


def test_tqdm_bars_with_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = _fit(tmp_path, callbacks=[TQDMProgressBar()])
    out = capsys.readouterr().out.replace("\r", "\n")
    assert "Neuron elimination: statistics" in out and "512/512" in out
    evaluated = sum(len(pts) for pts in callback.result.points.values())
    sweep = [line for line in out.splitlines() if line.startswith("Neuron elimination: sweep")]
    # counts of the planned grid (baseline and every p), with an ETA; full when the sweep ends
    planned = int(re.search(r"\| 0/(\d+) \[", sweep[0]).group(1))
    assert planned >= evaluated and f"| {planned}/{planned} [" in sweep[-1]
    assert "Neuron elimination: joint search (greedy)" in out


def test_rich_bars_join_the_trainers_display(tmp_path: Path) -> None:
    bar = RichProgressBar()
    _fit(tmp_path, callbacks=[bar])
    described = [task.description for task in bar.progress.tasks]
    assert "Neuron elimination: sweep" in described
    assert "Neuron elimination: joint search (greedy)" in described
    sweep = next(t for t in bar.progress.tasks if t.description == "Neuron elimination: sweep")
    assert sweep.completed == sweep.total


def test_nothing_when_the_progress_bar_is_disabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fit(tmp_path, enable_progress_bar=False)
    captured = capsys.readouterr()
    assert "Neuron elimination" not in captured.out + captured.err


def test_rank_zero_only_and_disabled_bars() -> None:
    other_rank = SimpleNamespace(progress_bar_callback=TQDMProgressBar(), is_global_zero=False)
    assert not ProgressBar(other_rank, "x", 3).enabled  # type: ignore[arg-type]
    off = SimpleNamespace(
        progress_bar_callback=TQDMProgressBar(refresh_rate=0), is_global_zero=True
    )
    assert not ProgressBar(off, "x", 3).enabled  # type: ignore[arg-type]
    none = SimpleNamespace(progress_bar_callback=None, is_global_zero=True)
    with ProgressBar(none, "x", 3) as bar:  # type: ignore[arg-type]
        bar.update(2)
        bar.advance()
        assert bar.done == 3 and not bar.enabled


def test_sample_count() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(100, 2)), batch_size=8)
    assert sample_count(loader) == 100
    assert sample_count(loader, 30) == 30
    assert sample_count(iter([1, 2]), 7) == 7
    assert sample_count(iter([1, 2])) is None
