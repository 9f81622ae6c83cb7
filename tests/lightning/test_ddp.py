from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_process_ddp_gives_the_same_reduction_on_every_rank(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["applied"] and r0["applied"] == r1["applied"]
    assert r0["plan"] == r1["plan"] and r0["shapes"] == r1["shapes"]
    assert r0["state_sha256"] == r1["state_sha256"]
    assert r0["results"] == r1["results"]
    # weights="best": both ranks reduced rank zero's best checkpoint; rank zero wrote it reduced.
    assert r0["source_checkpoint"] and r0["source_checkpoint"] == r1["source_checkpoint"]
    assert r0["reduced_checkpoint"] == r1["reduced_checkpoint"]
    assert Path(r0["reduced_checkpoint"]).is_file()
    # Only rank zero reports.
    assert r0["report_paths"] and r1["report_paths"] == []
    metrics = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(metrics) == 1 and "neuron_elimination/net.0/accuracy" in metrics[0].read_text()
