"""Streamed sequential fits on tiny random-init Llama decoders and MLP chains: the result equals
``reduce_junction`` applied layer by layer on statistics re-collected from the reduced model, one
junction's ``G`` lives at a time, bad input changes nothing, and the plan reloads."""

from __future__ import annotations

import copy
import math
import weakref
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import EnergyModel, FitOptions, JunctionError, ModelIO, SearchSettings
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.search.elimination import eliminate_neurons, reduce_junction
from lightning_neuronprune.search.streaming import plan_widths, reduce_streamed, run_plan
from lightning_neuronprune.structure.persistence import load_reduced, read_plan, save_reduced
from lightning_neuronprune.structure.targets import resolve_targets

transformers = pytest.importorskip("transformers")

VOCAB = 50


def _llama(layers: int = 3, intermediate: int = 48) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=intermediate, vocab_size=VOCAB, max_position_embeddings=64,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _batches(count: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length - 3 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _reference(model: nn.Module, junctions: list, ps: dict[str, int], data: list, method: str):
    """``reduce_junction`` layer by layer, each layer's statistics from a full pass of the model
    reduced upstream."""
    ref = copy.deepcopy(model)
    records = []
    for j in junctions:
        if ps[j.layer] < j.num_features:
            st = collect_statistics(ref, [j.consumer], data)[j.consumer]
            records.append(reduce_junction(ref, j, st, ps[j.layer], method=method))
    return ref, records


@pytest.mark.parametrize("method", ["svd_qr", "qr", "output"])
def test_streamed_equals_layer_by_layer_reduce_junction(method: str) -> None:
    model, data = _llama(), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    assert len(targets) == 3
    ps = {targets[0].layer: 30, targets[1].layer: 48, targets[2].layer: 17}  # layer 1 whole
    ref, ref_records = _reference(model, list(targets), ps, data, method)

    result = reduce_streamed(model, targets, ps, data, FitOptions(method=method))
    assert result.model is model
    assert [r.as_dict() for r in result.records] == [r.as_dict() for r in ref_records]
    assert read_plan(model) == [r.as_dict() for r in ref_records]
    state = model.state_dict()
    del state["neuron_elimination_plan"]  # the reference wrote no plan
    assert state.keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in state.items())
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths == [30, 48, 17]
    torch.testing.assert_close(_logits(model, data[0]), _logits(ref, data[0]), rtol=0, atol=0)


def test_streamed_fits_differ_from_one_shot_fits_downstream() -> None:
    """The first junction sees the original network either way; the second is fitted on the
    network reduced upstream, not on the original statistics."""
    model, data = _llama(layers=2), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    one_shot = copy.deepcopy(model)
    stats = collect_statistics(one_shot, [j.consumer for j in targets], data)
    for j in targets:
        reduce_junction(one_shot, j, stats[j.consumer], 24, method="qr")
    reduce_streamed(model, targets, 0.5, data, FitOptions(method="qr"))
    first, second = (j.consumer for j in targets)
    assert torch.equal(model.get_submodule(first).weight, one_shot.get_submodule(first).weight)
    assert not torch.allclose(
        model.get_submodule(second).weight, one_shot.get_submodule(second).weight
    )


def test_fraction_for_every_junction_and_plan_reload(tmp_path: Any) -> None:
    model, data = _llama(), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    reduced = reduce_streamed(model, targets, 0.3, data, FitOptions(method="qr")).model
    p = math.ceil(0.3 * 48)
    assert [r["p"] for r in read_plan(reduced)] == [p] * 3
    assert reduced.config.intermediate_size == p  # one width for every FFN: the config follows
    path = tmp_path / "reduced.pt"
    save_reduced(reduced, path)
    fresh = load_reduced(_llama(), path)
    torch.testing.assert_close(_logits(fresh, data[0]), _logits(reduced, data[0]), rtol=0, atol=0)


@contextmanager
def _live_grams():
    """Every n × n statistics matrix made inside (weak references, dtype and device), and how
    many of them were alive at each creation."""
    made: list[weakref.ref] = []
    kinds: set[tuple[torch.dtype, torch.device]] = set()
    alive_at_creation: list[int] = []
    zeros = JunctionStatistics.zeros.__func__  # type: ignore[attr-defined]

    def spy(cls: type, n: int, device: Any = None) -> JunctionStatistics:
        alive_at_creation.append(sum(r() is not None for r in made))
        stats = zeros(cls, n, device)
        made.append(weakref.ref(stats.gram))
        kinds.add((stats.gram.dtype, stats.gram.device))
        return stats

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JunctionStatistics, "zeros", classmethod(spy))
        yield made, alive_at_creation, kinds


def test_one_junction_statistics_alive_at_a_time() -> None:
    model, data = _llama(layers=4), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    with _live_grams() as (made, alive, kinds):
        reduce_streamed(model, targets, 0.5, data, FitOptions(method="qr"))
    assert len(made) == 4 and alive == [0, 0, 0, 0]
    assert all(r() is None for r in made)  # nothing kept after the run
    assert kinds == {(torch.float64, torch.device("cpu"))}  # float64, on the model's device


def test_all_at_once_holds_every_junction_statistics() -> None:
    """The contrast: collecting every junction's statistics at once keeps L matrices alive."""
    model, data = _llama(layers=4), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    with _live_grams() as (made, alive, _):
        stats = collect_statistics(model, [j.consumer for j in targets], data)
        assert alive == [0, 1, 2, 3]
        del stats


@pytest.mark.parametrize(
    ("widths", "options", "match"),
    [
        ({"model.layers.9.mlp.gate_proj": 10}, None, "not among the targets"),
        ({"model.layers.0.mlp.gate_proj": 0}, None, r"p=0, but it must be an integer in \[1, 48\]"),
        ({"model.layers.1.mlp.gate_proj": 49}, None, "p=49"),
        ({"model.layers.1.mlp.gate_proj": 12.0}, None, "p=12.0"),
        ({"model.layers.1.mlp.gate_proj": True}, None, "p=True"),
        (
            {"model.layers.0.mlp.gate_proj": 10, "model.layers.0.mlp.up_proj": 12},
            None, "more than once",
        ),
        ({}, None, "empty mapping"),
        (0.0, None, r"fraction must lie in \(0, 1\]"),
        (1.5, None, r"fraction must lie in \(0, 1\]"),
        (float("nan"), None, r"fraction must lie in \(0, 1\]"),
        ("half", None, "must be a mapping"),
        (0.5, {"method": "qr"}, "`options` must be a FitOptions"),
    ],
)  # fmt: skip
def test_bad_input_leaves_the_model_untouched(widths: Any, options: Any, match: str) -> None:
    model, data = _llama(), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    state = _state(model)
    # the last junction's p is fine: a bad one after a good one must still change nothing
    if isinstance(widths, dict) and len(widths) == 1:
        widths = {"model.layers.0.mlp.gate_proj": 20, **widths}
    with pytest.raises(ValueError, match=match):
        reduce_streamed(model, targets, widths, data, options)
    assert _same(model, state) and read_plan(model) == []


def test_bad_max_samples_and_no_junctions() -> None:
    model, data = _llama(layers=1), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    with pytest.raises(ValueError, match="`max_samples` must be a positive integer"):
        reduce_streamed(model, targets, 0.5, data, max_samples=0)
    with pytest.raises(JunctionError, match="`junctions` is empty"):
        reduce_streamed(model, [], 0.5, data)
    assert read_plan(model) == []


def test_plan_widths_in_network_order_and_skips_whole_layers() -> None:
    model, data = _llama(), _batches()
    targets = resolve_targets(model, "auto", example=data[0])
    plan = plan_widths(
        model, targets,
        {"model.layers.2.mlp.up_proj": 5, "model.layers.0.mlp.up_proj": 7,
         "model.layers.1.mlp.gate_proj": 48},
    )  # fmt: skip
    assert [(j.layer, p) for j, p in plan] == [
        ("model.layers.0.mlp.gate_proj", 7),
        ("model.layers.2.mlp.gate_proj", 5),
    ]


def test_mlp_chain_matches_eliminate_neurons_with_data(seed: int) -> None:
    """A chain through a gather (``0:in``), then two producers: the same sequential
    re-collection as ``eliminate_neurons(data=...)``."""
    model = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    )
    data = [torch.randn(32, 10) for _ in range(3)]
    ps = {"0:in": 7, "0": 9, "2": 5}
    expected, _ = eliminate_neurons(model, ps, data=data, method="qr")
    targets = resolve_targets(model, list(ps))
    lines: list[str] = []
    bars: list[tuple[str, int | None, str, list[int]]] = []

    @contextmanager
    def progress(description: str, total: int | None, unit: str):
        steps: list[int] = []

        class Bar:
            def update(self, done: int) -> None:
                steps.append(done)

            def advance(self, n: int = 1) -> None:
                steps.append(n)

        bars.append((description, total, unit, steps))
        yield Bar()

    io = ModelIO(info=lines.append, progress=progress)
    reduce_streamed(model, targets, ps, data, FitOptions(method="qr"), io=io)
    assert _same(model, expected.state_dict())
    assert bars == [("Neuron elimination: streamed fits", 3, "junctions", [1, 1, 1])]
    assert len(lines) == 3 and lines[0].startswith("neuron elimination [1/3] 0:in: kept 7 of 10")


def test_max_samples_caps_every_pass(seed: int) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [torch.randn(16, 6) for _ in range(4)]
    expected, _ = eliminate_neurons(model, {"0": 4}, data=data[:2], method="qr")
    targets = resolve_targets(model, ["0"])
    reduce_streamed(model, targets, {"0": 4}, data, FitOptions(method="qr"), max_samples=32)
    assert _same(model, expected.state_dict())


def test_run_plan_measures_before_and_after(seed: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 6)
    y = model(x).argmax(1)
    train, evaluation = [x[:32], x[32:]], [(x, y)]
    targets = resolve_targets(model, ["0", "2"])
    settings = SearchSettings(apply={"0": 6, "2": 8}, options=FitOptions(method="qr"))
    warnings: list[str] = []
    metric = MulticlassAccuracy(3, average="micro")
    result, elimination = run_plan(
        model, targets, settings, EnergyModel(), evaluation, metric, x[:1], train,
        ModelIO(warn=warnings.append),
    )  # fmt: skip
    assert result.applied and dict(result.decision.plan) == {"0": 6}
    assert {layer: [pt.p for pt in pts] for layer, pts in result.points.items()} == {
        "0": [12], "2": [8],
    }  # fmt: skip
    (point,) = result.joint_points
    assert point is result.decision.chosen and point.strategy == "streamed"
    assert point.config == {"0": 6, "2": 8} and point.kept == {"0": elimination.records[0].kept}
    assert point.accuracy == pytest.approx(
        (model(x).argmax(1) == y).float().mean().item(), abs=1e-6
    )
    assert point.energy_ratio > 1 and model[0].out_features == 6
    assert (point.accuracy_drop > settings.max_degradation) == bool(warnings)
