from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_neuronprune.cost.energy import EnergyModel
from lightning_neuronprune.lightning.reporting import (
    PREFIX,
    log_joint_scalars,
    log_scalars,
    markdown_table,
    point_metrics,
    write_report,
)
from lightning_neuronprune.search.joint import JointPoint
from lightning_neuronprune.search.sweep import SweepPoint

MEMORY_KEYS = {"memory_params_bits", "memory_total_bits"}


class _Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((metrics, step))

    def save(self) -> None:
        pass


@pytest.fixture
def points() -> list[SweepPoint]:
    full = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    small = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    e0 = EnergyModel().estimate(full, torch.zeros(1, 6))
    e1 = EnergyModel().estimate(small, torch.zeros(1, 6))
    return [
        SweepPoint("0", 8, 8, 0.9, 0.0, e0, 1.0, 1.0, tuple(range(8))),
        SweepPoint(
            "0", 4, 8, 0.85, 0.05, e1, e0.energy_ratio(e1), e0.memory_ratio(e1), (0, 1, 2, 3)
        ),
    ]


def test_memory_has_one_name_in_csv_json_and_logger(
    tmp_path: Path, points: list[SweepPoint]
) -> None:
    joint = JointPoint({"0": 4}, 0.85, 0.05, points[1].energy, 2.0, 2.0, "greedy")
    json_path, csv_path = write_report(
        tmp_path, points, points[1], extra={"joint": [joint.as_dict()]}
    )
    with csv_path.open() as f:
        header = set(next(csv.reader(f)))
    doc = json.loads(json_path.read_text())
    logged = {k.rsplit("/", 1)[1] for k in point_metrics(points[1])}
    for keys in (header, set(doc["points"][0]), set(doc["joint"][0]), logged):
        assert keys >= MEMORY_KEYS
        assert not {k for k in keys if k.startswith("memory_")} - MEMORY_KEYS - {"memory_ratio"}
    assert doc["points"][1]["memory_params_bits"] == points[1].energy.params_bits == 32 * (24 + 12)
    assert doc["chosen"]["kept"] == [0, 1, 2, 3]


def test_log_scalars_by_increasing_p_and_baseline(points: list[SweepPoint]) -> None:
    rec = _Recorder()
    log_scalars([rec], points)
    steps = [step for _, step in rec.rows]
    assert steps == [0, 4, 8]
    assert f"{PREFIX}/baseline/accuracy" in rec.rows[0][0]
    assert rec.rows[1][0][f"{PREFIX}/0/memory_params_bits"] == points[1].energy.params_bits


def test_joint_scalars_and_table(points: list[SweepPoint]) -> None:
    joint = JointPoint({"0": 4}, 0.85, 0.05, points[1].energy, 2.0, 2.0, "greedy")
    rec = _Recorder()
    log_joint_scalars([rec], [joint])
    assert rec.rows[0][0][f"{PREFIX}/joint/p/0"] == 4.0
    table = markdown_table([*points, joint], chosen=joint)
    assert table.count("\n") == 2 + 3 and "**chosen**" in table.splitlines()[-1]
    assert "0: p=4/8 | single" in table
