"""Recording with ``stop_early``: each forward pass ends right after the last tapped consumer, and
the statistics are those of a full pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neuronprune.core.recording import collect_statistics, stream_inputs

transformers = pytest.importorskip("transformers")

VOCAB = 50


def _llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (2, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0  # padding counts for nothing, stopped or not
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _calls(model: nn.Module, names: list[str]) -> tuple[dict[str, int], list]:
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            counts[name] += 1

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    return counts, handles


@pytest.mark.parametrize(
    "consumers", [["model.layers.0.mlp.down_proj"], ["model.layers.0.mlp.down_proj",
                                                     "model.layers.1.mlp.down_proj"]]
)  # fmt: skip
def test_stopped_pass_gives_the_statistics_of_a_full_pass(consumers: list[str]) -> None:
    model, data = _llama(), _batches()
    full = collect_statistics(model, consumers, data)
    later = ["model.layers.2.mlp.gate_proj", "lm_head"]
    counts, handles = _calls(model, later)
    try:
        stopped = collect_statistics(model, consumers, data, stop_early=True)
    finally:
        for h in handles:
            h.remove()
    assert counts == dict.fromkeys(later, 0)  # nothing after the last consumer ran
    for name in consumers:
        assert stopped[name].count == full[name].count == 3 * 14
        assert stopped[name].gram.dtype == torch.float64
        assert torch.equal(stopped[name].gram, full[name].gram)
        assert torch.equal(stopped[name].total, full[name].total)


def test_stopped_passes_restore_modes_and_hooks() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    model.train()
    model[1].eval()
    data = [torch.randn(8, 4) for _ in range(2)]
    stopped = collect_statistics(model, ["2"], data, stop_early=True)["2"]
    X = torch.cat([model[1](model[0](x)) for x in data]).double()
    torch.testing.assert_close(stopped.gram, X.T @ X, rtol=1e-12, atol=1e-12)
    assert model.training and model[0].training and not model[1].training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model(data[0]).shape == (8, 2)  # the model still runs to its end


def test_stream_inputs_stops_each_model_after_its_own_taps() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    seen: list[tuple[int, tuple[int, ...]]] = []
    counts, handles = _calls(b, ["4"])
    try:
        fed = stream_inputs(
            [a, b], [(0, "2"), (1, "2")], [torch.randn(5, 3)] * 2,
            lambda tap, rows, shape, pad: seen.append((tap, shape)), stop_early=True,
        )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    assert fed == 10 and seen == [(0, (5, 4)), (1, (5, 4))] * 2
    assert counts == {"4": 0}
