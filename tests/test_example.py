"""End-to-end runs of ``examples/mnist_lenet.py`` and ``examples/cnn.py`` as subprocesses, on
real MNIST."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_neuronprune import load_reduced, read_plan
from lightning_neuronprune.testing.models import LitClassifier

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet.py"
CNN_EXAMPLE = EXAMPLE.with_name("cnn.py")


@pytest.mark.slow
def test_mnist_lenet_example(mnist_dir: Path, tmp_path: Path) -> None:
    log_dir, output = tmp_path / "logs", tmp_path / "reduced.pt"
    cmd = [
        sys.executable, str(EXAMPLE), "--data-dir", str(mnist_dir), "--epochs", "1",
        "--limit-train", "5000", "--log-dir", str(log_dir), "--output", str(output),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    )

    assert "Neuron elimination summary" in out
    for target in ("net.fc1", "net.fc2", "net.fc1:in"):
        assert any(line.startswith(target + " ") for line in out.splitlines()), out
    assert "applied:" in out
    # The test drop is printed against the budget at the end.
    assert re.search(r"test drop: -?\d+\.\d\d points, (within|OVER) the budget of 2\.00", out)
    assert "outputs match" in out
    assert f"tensorboard --logdir {log_dir}" in out

    # The run directory holds the TensorBoard events and the sweep report.
    run_dirs = list((log_dir / "mnist_lenet300100").glob("version_*"))
    assert len(run_dirs) == 1
    assert list(run_dirs[0].glob("events.out.tfevents.*"))
    assert (run_dirs[0] / "neuron_elimination.json").is_file()
    assert (run_dirs[0] / "neuron_elimination.csv").is_file()

    # The saved model reloads into a fresh module, with fewer parameters than the original.
    assert output.is_file()
    fresh = LitClassifier("lenet300100")
    n_original = sum(p.numel() for p in fresh.parameters())
    reloaded = load_reduced(fresh, output).eval()
    assert read_plan(reloaded), "the reloaded model carries no elimination plan"
    assert sum(p.numel() for p in reloaded.parameters()) < n_original
    with torch.no_grad():
        logits = reloaded(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


TRANSFORMER = EXAMPLE.parent / "transformer.py"


@pytest.mark.slow
def test_transformer_example(mnist_dir: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(TRANSFORMER), "--data-dir", str(mnist_dir), "--epochs", "1",
        "--limit-train", "1000", "--val-size", "500", "--depth", "2", "--dim", "32",
        "--hidden", "64", "--grid", "4", "--max-samples", "500", "--max-degradation", "0.05",
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(TRANSFORMER.parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert "found junctions: ['net.blocks.0.mlp.fc1', 'net.blocks.1.mlp.fc1']" in out
    assert "FFN neurons removed:" in out
    assert "test set (held out): accuracy" in out


@pytest.mark.slow
def test_cnn_example_reduces_conv_channels(mnist_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "cnn.pt"
    cmd = [
        sys.executable, str(CNN_EXAMPLE), "--data-dir", str(mnist_dir), "--epochs", "1",
        "--limit-train", "3000", "--val-size", "1000", "--max-samples", "2000",
        "--targets", "net.conv1", "net.conv2", "--joint", "none", "--ranks", "3",
        "--max-degradation", "0.05", "--output", str(output),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert "targets: ['net.conv1', 'net.conv2']" in out
    assert re.search(r"applied: \{'net\.conv[12]': \d+\}", out), out
    assert re.search(r"energy ratio: \d+\.\d\d× lower", out)
    assert re.search(r"test accuracy: 0\.\d{4} before, 0\.\d{4} after", out)
    assert "outputs match" in out
    fresh = load_reduced(LitClassifier("lenet5"), output)
    assert [r["kind"] for r in read_plan(fresh)] == ["conv"]


LLM = EXAMPLE.parent / "llm.py"


@pytest.mark.slow
def test_llm_example_tiny(tmp_path: Path) -> None:
    """The causal-LM example end to end on a random tiny Llama and synthetic tokens."""
    pytest.importorskip("transformers")
    log_dir = tmp_path / "logs"
    cmd = [
        sys.executable, str(LLM), "--tiny", "--calib-tokens", "1024", "--eval-tokens", "512",
        "--held-out-tokens", "512", "--seq-len", "64", "--max-evaluations", "4",
        "--log-dir", str(log_dir),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(LLM.parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert "2 decoder layers, FFN width 64" in out
    widths = re.search(r"FFN width per layer \(64 before\): \[(\d+), (\d+)\]", out)
    assert widths, out
    assert all(1 <= int(w) <= 64 for w in widths.groups())
    assert re.search(r"modelled energy ratio \d+\.\d{3}x", out), out
    assert re.search(r"held-out perplexity: \d+\.\d{3} before, \d+\.\d{3} after", out), out
    assert re.search(r"wall time \d+s", out)
    assert list((log_dir / "llm_tiny").glob("version_*/events.out.tfevents.*"))
