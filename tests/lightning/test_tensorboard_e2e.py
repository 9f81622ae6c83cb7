"""End to end: the callback's output, as served by a real TensorBoard server over its HTTP API.

A tiny fit writes events with ``TensorBoardLogger``; ``python -m tensorboard.main`` serves them on
the loopback interface, and the test reads back the scalar, image and text tags that the callback
logged. The server runs with TensorBoard's defaults (its fast Rust data server when installed), as a
user would start it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from lit_models import BlobsData, LitMLP
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_neuronprune import NeuronEliminationCallback

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

TARGETS = ["net.0", "net.2"]
PREFIX = "neuron_elimination"
#: The longest the test waits for the server to answer with the callback's tags.
DEADLINE_S = 60.0

# Loopback only: never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(base: str, path: str, **query: Any) -> bytes:
    url = f"{base}/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with _OPENER.open(url, timeout=10) as response:
        return response.read()


def _get_json(base: str, path: str, **query: Any) -> Any:
    return json.loads(_get(base, path, **query))


class _Served:
    def __init__(self, base: str, run: str, callback: NeuronEliminationCallback) -> None:
        self.base, self.run, self.callback = base, run, callback

    def json(self, path: str, **query: Any) -> Any:
        return _get_json(self.base, path, **query)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Served]:
    """Fit a tiny model with the callback, then serve its log dir with TensorBoard."""
    root = tmp_path_factory.mktemp("tensorboard_e2e")
    pl.seed_everything(0, workers=True)
    callback = NeuronEliminationCallback(targets=TARGETS, max_degradation=0.05)
    logger = TensorBoardLogger(root / "logs", name="blobs")
    trainer = pl.Trainer(
        max_epochs=3, default_root_dir=root, logger=logger, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(LitMLP(), datamodule=BlobsData())
    assert callback.result.points, "the callback evaluated no configuration"
    run = Path(logger.log_dir).relative_to(root / "logs").as_posix()  # "blobs/version_0"

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = (root / "tensorboard.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tensorboard.main", "--logdir", str(root / "logs"),
            "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "2",
        ],
        stdout=server_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_for_run(proc, base, run, root / "tensorboard.log")
        yield _Served(base, run, callback)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        server_log.close()


def _wait_for_run(proc: subprocess.Popen, base: str, run: str, log_path: Path) -> None:
    """Poll until the server lists the callback's scalar tags for ``run`` (bounded in time)."""
    deadline = time.monotonic() + DEADLINE_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"TensorBoard exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        try:
            tags = _get_json(base, "data/plugin/scalars/tags")
            last = tags
            if any(t.startswith(PREFIX + "/") for t in tags.get(run, {})):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as err:
            last = err  # not listening yet, or still loading
        time.sleep(0.5)
    pytest.fail(
        f"TensorBoard did not serve the scalars of {run!r} within {DEADLINE_S:.0f}s; last answer: "
        f"{last!r}\nserver log:\n{log_path.read_text()[-3000:]}"
    )


@pytest.mark.slow
def test_runs_and_plugins(served: _Served) -> None:
    assert served.run in served.json("data/runs")
    plugins = served.json("data/plugins_listing")
    for name in ("scalars", "images", "text"):
        assert plugins.get(name, {}).get("enabled"), f"plugin {name!r} disabled: {plugins}"


@pytest.mark.slow
def test_scalar_tags(served: _Served) -> None:
    tags = set(served.json("data/plugin/scalars/tags")[served.run])
    for layer in TARGETS:
        for metric in ("p", "accuracy", "accuracy_drop", "energy_total", "energy_ratio",
                       "memory_ratio", "params"):  # fmt: skip
            assert f"{PREFIX}/{layer}/{metric}" in tags, sorted(tags)
    assert f"{PREFIX}/baseline/accuracy" in tags
    assert "val_loss" in tags  # the module's own metrics are still there

    # The accuracy series holds values the callback measured, at step p.
    layer = TARGETS[0]
    series = served.json(
        "data/plugin/scalars/scalars", run=served.run, tag=f"{PREFIX}/{layer}/accuracy"
    )
    measured = {pt.p: pt.accuracy for pt in served.callback.result.points[layer]}
    assert series
    for _wall_time, step, value in series:
        assert step in measured
        assert value == pytest.approx(measured[step], abs=1e-6)


@pytest.mark.slow
def test_joint_scalars(served: _Served) -> None:
    joint = served.callback.result.joint_points
    if not joint:
        pytest.skip("the callback evaluated no joint configuration")
    tags = set(served.json("data/plugin/scalars/tags")[served.run])
    for metric in ("accuracy", "energy_total", "energy_ratio"):
        assert f"{PREFIX}/joint/{metric}" in tags, sorted(tags)
        assert f"{PREFIX}/joint_front/{metric}" in tags, sorted(tags)
    # Joint configurations are logged with increasing steps, so every one of them is served.
    series = served.json(
        "data/plugin/scalars/scalars", run=served.run, tag=f"{PREFIX}/joint/accuracy"
    )
    assert [value for _, _, value in series] == pytest.approx(
        [pt.accuracy for pt in joint], abs=1e-6
    )


@pytest.mark.slow
def test_every_sweep_point_is_served(served: _Served) -> None:
    for layer, points in served.callback.result.points.items():
        series = served.json(
            "data/plugin/scalars/scalars", run=served.run, tag=f"{PREFIX}/{layer}/energy_total"
        )
        assert sorted(step for _, step, _ in series) == sorted(pt.p for pt in points), layer


@pytest.mark.slow
def test_tradeoff_figure(served: _Served) -> None:
    tags = served.json("data/plugin/images/tags")[served.run]
    assert f"{PREFIX}/tradeoff" in tags
    images = served.json(
        "data/plugin/images/images", run=served.run, tag=f"{PREFIX}/tradeoff", sample=0
    )
    assert len(images) == 1
    png = _get(served.base, "data/plugin/images/individualImage?" + images[0]["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 5_000  # a rendered plot, not an empty image


@pytest.mark.slow
def test_configurations_text(served: _Served) -> None:
    tags = served.json("data/plugin/text/tags")[served.run]
    text_tags = [t for t in tags if t.startswith(f"{PREFIX}/configurations")]
    assert text_tags, tags
    entries = served.json("data/plugin/text/text", run=served.run, tag=text_tags[0])
    assert entries
    html = entries[0]["text"]
    assert "<table>" in html
    for layer in TARGETS:
        assert layer in html
