"""The benchmark scripts run end to end and write well-formed tables.

``benchmarks/reproduce_paper.py --quick`` and ``benchmarks/bench_sweep.py --tiny`` run as
subprocesses on real MNIST (skipped when it is absent). No timing is asserted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench_modules import BENCHMARKS, load_benchmark

PAPER_ROWS = [
    "LeNet300-100-FC1",
    "LeNet300-100-FC2",
    "LeNet300-100-FC3",
    "LeNet5-FC1",
    "LeNet5-FC2",
]
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?"


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables keyed by the ``####`` heading above them; rows as {header: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header, rows = "", None, None
    for line in markdown.splitlines() + [""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if header is None:
                header, rows = cells, []
            elif set(line.replace("|", "").strip()) <= {"-"}:
                continue
            else:
                assert len(cells) == len(header), f"ragged row under {heading!r}: {line}"
                rows.append(dict(zip(header, cells, strict=True)))
        elif header is not None:
            key, k = heading, 1
            while key in tables:  # several tables under one heading: "heading #2", ...
                k += 1
                key = f"{heading} #{k}"
            tables[key] = rows
            header, rows = None, None
    return tables


def _table(tables: dict[str, list[dict[str, str]]], prefix: str) -> list[dict[str, str]]:
    matches = [rows for heading, rows in tables.items() if heading.startswith(prefix)]
    assert matches, f"no table under a heading starting with {prefix!r}: {sorted(tables)}"
    assert matches[0], f"the table {prefix!r} is empty"
    return matches[0]


def test_write_section_keeps_hand_written_text(tmp_path: Path) -> None:
    write_section = load_benchmark("reproduce_paper").write_section
    path = tmp_path / "RESULTS.md"
    write_section(path, "bench", "first")
    path.write_text("# Title\n\nintro\n\n" + path.read_text() + "\nnotes after\n")
    write_section(path, "bench", "second")
    write_section(path, "other", "third")
    text = path.read_text()
    assert text.startswith("# Title\n\nintro\n\n")
    assert "second" in text and "first" not in text and "notes after" in text
    assert text.count("<!-- BEGIN bench ") == 1 and text.index("second") < text.index("third")


@pytest.mark.slow
def test_reproduce_paper_quick(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs"
    stdout = _run(
        [
            str(BENCHMARKS / "reproduce_paper.py"),
            "--quick",
            "--threads",
            "1",
            "--data-dir",
            str(mnist_dir),
            "--out-dir",
            str(out),
            "--json",
            str(tmp_path / "curves.json"),
        ],
        tmp_path,
    )
    text = (out / "RESULTS.md").read_text()
    assert "<!-- BEGIN reproduce_paper" in text and "<!-- END reproduce_paper -->" in text
    assert "#### Memory table" in stdout
    tables = _tables(text)

    trained = _table(tables, "Trained networks")
    assert [r["network"] for r in trained] == ["LeNet-300-100", "LeNet-5"]
    for r in trained:
        assert 0 < float(r["test top-1 (ours) %"]) <= 100

    memory = _table(tables, "Memory table")
    assert [r["layer"] for r in memory] == PAPER_ROWS
    for r in memory:
        n, p = r["n → p"].split(" → ")
        assert p == "—" or 1 <= int(p) <= int(n), r
        # ours first, the paper's figure in parentheses
        assert re.fullmatch(rf"{NUMBER} \({NUMBER}\)", r["acc before %"]), r
        if p != "—":
            assert re.fullmatch(rf"{NUMBER}x \({NUMBER}x\)", r["ratio"]), r
            assert int(r["params after"].replace(",", "")) < int(
                r["params before"].replace(",", "")
            )

    energy = _table(tables, "Energy table")
    originals = [r for r in energy if "original" in r["configuration"]]
    assert len(originals) == 4  # paper and ours, for both networks
    ours = {r["configuration"]: r for r in originals}
    assert ours["LeNet-5 original (ours)"]["total µJ"] == "288.27"
    assert ours["LeNet-300-100 original (ours)"]["DRAM µJ"] == "170.37"
    for r in energy:
        if "p = " in r["configuration"]:
            assert re.match(rf"{NUMBER}x", r["energy ratio"]), r

    checks = _table(tables, "The paper's two energy ratios")
    assert {r["paper"] for r in checks} == {"26.71x", "33.02x"}

    baselines = _table(tables, "Baselines and variants")
    methods = {r["method"] for r in baselines}
    assert {"magnitude, no update", "magnitude + LS update", "svd_qr, affine=True"} <= methods
    assert any(m.startswith("random + LS") for m in methods)
    assert {r["layer"] for r in baselines} == set(PAPER_ROWS)

    for image in ("accuracy_vs_p.png", "accuracy_vs_energy.png"):
        assert (out / "images" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"images/{image}" in text
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert set(curves) == {"lenet300100", "lenet5"}


@pytest.mark.slow
def test_bench_sweep_tiny(mnist_dir: Path, tmp_path: Path) -> None:
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    stdout = _run(
        [
            str(BENCHMARKS / "bench_sweep.py"),
            "--tiny",
            "--threads",
            "1",
            "--data-dir",
            str(mnist_dir),
            "--markdown",
            str(md),
            "--json",
            str(js),
            "--profile",
            "10",
        ],
        tmp_path,
    )
    assert "Agreement and speed-up" in stdout
    tables = _tables(md.read_text())

    phases = [
        "statistics", "evaluation cache", "selection", "reconstruction", "evaluation", "energy",
        "sweep", "other",
    ]  # fmt: skip
    times = _table(tables, "Wall time per phase")
    assert [r["run"].split(" ", 1)[1] for r in times] == [
        "project svd_qr",
        "project qr",
        "straightforward",
    ]
    for r in times:
        values = [float(r[k]) for k in phases]
        assert all(v >= 0 for v in values)
        assert float(r["total"]) == pytest.approx(sum(values), abs=0.05)
        assert int(r["points"]) > 50  # every p of a 100-neuron layer, from rank(X) down

    agreement = _table(tables, "Agreement and speed-up")[0]
    same, total = map(int, agreement["same kept set"].split("/"))
    assert total > 50 and same >= total - 2  # the two only part at numerical ties
    assert float(agreement["max abs Δacc % where sets agree"]) < 0.2
    assert re.fullmatch(rf"{NUMBER}x", agreement["speed-up (svd_qr)"])

    scale = _table(tables, "CaffeNet-sized classifier")
    assert [r["method"] for r in scale] == ["svd_qr", "qr"]
    qr = _table(tables, "pivoted_qr vs LAPACK geqp3")
    assert [r["dtype"] for r in qr] == ["float32", "float64"]
    assert all(r["same pivots"].startswith("yes") for r in qr), qr
    data = json.loads(js.read_text())
    assert set(data["scale"]) == {"svd_qr", "qr"}
    assert data["mnist"]["LeNet300-100-FC3"]["points"] > 50


@pytest.mark.slow
def test_bench_transformer_tiny(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_transformer.py"), "--synthetic", "--depth", "2",
         "--stats-size", "40", "--eval-size", "20", "--points", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for line in (
        "probe: 2 FFN junctions",
        "statistics of 2 FFN inputs",
        "G update, masked",
        "GatheredLinear (p=128)",
        "full forward per p",
        "all 2 FFN junctions, cached",
    ):
        assert line in proc.stdout, proc.stdout  # fmt: skip


@pytest.mark.slow
def test_bench_discovery_tiny(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_discovery.py"), "--models", "tiny-4,tiny-8",
         "--repeat", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert [r[0].strip() for r in rows] == ["tiny-4", "tiny-8"]
    assert rows[0][3] == rows[1][3]  # as many whole-model forwards at 4 and 8 layers
