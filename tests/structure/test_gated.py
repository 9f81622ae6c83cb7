"""Gated FFNs end to end on tiny random-init Hugging Face decoders (no weights are downloaded):
discovery (``targets="auto"``, names, its cost on deep models), surgery, ``generate()``,
``save_pretrained``/``from_pretrained``, the plan-based reload and a lossless reduction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.search.elimination import eliminate_neurons, reduce_junction
from lightning_neuronprune.structure.blocks import RepeatedBlocks
from lightning_neuronprune.structure.discovery import auto_junctions, find_junction, find_junctions
from lightning_neuronprune.structure.persistence import load_reduced, read_plan, save_reduced
from lightning_neuronprune.structure.probe import JunctionProbe
from lightning_neuronprune.structure.targets import resolve_targets

transformers = pytest.importorskip("transformers")

VOCAB = 50
FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3")


def _config(family: str, layers: int = 2, intermediate: int = 48):
    common = dict(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=intermediate, vocab_size=VOCAB, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "gemma":  # tanh-GELU gate
        return transformers.GemmaConfig(head_dim=16, hidden_act="gelu_pytorch_tanh", **common)
    if family == "phi3":  # fused gate_up_proj
        return transformers.Phi3Config(**common)
    raise ValueError(family)


def _model(family: str, layers: int = 2, intermediate: int = 48) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        _config(family, layers, intermediate)
    ).eval()


def _batch(n: int = 2, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _producers(family: str, i: int) -> tuple[str, ...]:
    mlp = f"model.layers.{i}.mlp."
    if family == "phi3":
        return (mlp + "gate_up_proj",)
    return (mlp + "gate_proj", mlp + "up_proj")


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_finds_every_gated_ffn_and_leaves_attention_alone(family: str) -> None:
    model = _model(family)
    state = _state(model)
    targets = resolve_targets(model, "auto", example=_batch())
    assert [(j.kind, j.producers, j.consumer, j.fused) for j in targets] == [
        ("gated", _producers(family, i), f"model.layers.{i}.mlp.down_proj", family == "phi3")
        for i in range(2)
    ]
    assert all(j.num_features == 48 for j in targets)
    assert not any("self_attn" in name for j in targets for name in j.modules)
    # every producer and the consumer's input name the same junction
    for i in range(2):
        for name in (*_producers(family, i), f"model.layers.{i}.mlp.down_proj:in"):
            assert find_junction(model, name).consumer == f"model.layers.{i}.mlp.down_proj"
        assert targets.layer(_producers(family, i)[-1]) == _producers(family, i)[0]
    torch.testing.assert_close(_state(model), state, rtol=0, atol=0)


def test_tracing_alone_finds_the_gated_ffns() -> None:
    model = _model("llama")
    targets = resolve_targets(model, "auto")  # no example: torch.fx on each MLP
    assert [j.producers for j in targets] == [_producers("llama", i) for i in range(2)]
    assert "model.layers.0.mlp.up_proj" not in targets.undecided


def test_t5_geglu_is_found_by_the_probe() -> None:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=1, num_decoder_layers=1,
        num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = _batch()["input_ids"]
    batch = {"input_ids": ids, "decoder_input_ids": ids}
    found = auto_junctions(model, example=batch)
    ffn = ("encoder.block.0.layer.1.DenseReluDense", "decoder.block.0.layer.2.DenseReluDense")
    assert [(j.producers, j.consumer) for j in found] == [
        ((f"{f}.wi_0", f"{f}.wi_1"), f"{f}.wo") for f in ffn
    ]
    reduced, _ = eliminate_neurons(model, {found[0].target: 40}, data=[batch], junctions=found)
    assert reduced.encoder.block[0].layer[1].DenseReluDense.wi_1.out_features == 40
    assert reduced(**batch).logits.shape == model(**batch).logits.shape
    assert reduced.config.d_ff == 48  # the decoder's FFN keeps its width


def test_discovery_cost_does_not_grow_with_depth() -> None:
    """Identical blocks are probed once, and at block scope: the first decoder layer runs alone
    on its recorded inputs. The whole model runs as often for 4 as for 8 layers (counted with a
    hook on it), and the block passes are the same, each 1/L of a forward."""
    full, block = {}, {}
    for layers in (4, 8):
        model = _model("llama", layers=layers, intermediate=16)
        forwards = []  # an independent count: calls of the model itself
        hook = model.register_forward_pre_hook(lambda m, args, calls=forwards: calls.append(1))
        try:
            probe = JunctionProbe(model, _batch(1, 6))
            found = auto_junctions(model, probe=probe)
        finally:
            hook.remove()
        assert len(found) == layers
        assert probe.full_passes == len(forwards)
        assert probe.passes == probe.full_passes + probe.block_passes
        assert probe.cost == pytest.approx(probe.full_passes + probe.block_passes / layers)
        full[layers], block[layers] = probe.full_passes, probe.block_passes
    assert full[4] == full[8] and block[4] == block[8]
    # the baseline, down_proj (its output leaves the block by the residual stream) and lm_head;
    # the attention projections and the gated FFN are decided inside the block
    assert full[8] <= 3, full  # 3 with transformers 5.25
    assert block[8] <= 30, block  # 23 with transformers 5.25


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_uniform_width_reloads_with_from_pretrained(tmp_path: Path, family: str) -> None:
    model = _model(family)
    batch = _batch()
    layers = {_producers(family, i)[0]: 40 for i in range(2)}
    reduced, records = eliminate_neurons(model, layers, data=[batch, _batch(seed=2)])
    assert [r.kind for r in records] == ["gated", "gated"]
    assert reduced.config.intermediate_size == 40 and model.config.intermediate_size == 48
    mlp = reduced.model.layers[1].mlp
    if family == "phi3":
        assert mlp.gate_up_proj.out_features == 80
    else:
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 40
    assert mlp.down_proj.in_features == 40
    want = _logits(reduced, batch)
    out = reduced.generate(batch["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)

    fresh = load_reduced(_model(family), reduced.state_dict())  # the plan replays the config too
    assert fresh.config.intermediate_size == 40
    torch.testing.assert_close(_logits(fresh, batch), want, rtol=0, atol=0)

    reduced.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == 40
    torch.testing.assert_close(_logits(reloaded, batch), want, rtol=0, atol=0)


def test_per_layer_widths_reload_with_the_plan(tmp_path: Path) -> None:
    model = _model("llama")
    batch = _batch()
    layers = {"model.layers.0.mlp.gate_proj": 40, "model.layers.1.mlp.up_proj": 24}
    reduced, records = eliminate_neurons(model, layers, data=[batch])
    assert reduced.config.intermediate_size == 48  # per-layer widths: from_pretrained cannot
    assert [r.p for r in records] == [40, 24]
    assert reduced.model.layers[1].mlp.gate_proj.out_features == 24
    assert [rec["producers"] for rec in read_plan(reduced)] == [
        list(_producers("llama", i)) for i in range(2)
    ]
    save_reduced(reduced, tmp_path / "reduced.pt")
    fresh = load_reduced(_model("llama"), tmp_path / "reduced.pt")
    torch.testing.assert_close(_logits(fresh, batch), _logits(reduced, batch), rtol=0, atol=0)
    assert fresh.generate(batch["input_ids"][:1], max_new_tokens=3).shape == (1, 11)


def test_linearly_dependent_ffn_neurons_are_removed_losslessly() -> None:
    """Neurons 32..47 of layer 0 copy neurons 0..15 (gate and up rows): rank 32 of 48, so
    keeping 32 and re-fitting ``down_proj`` leaves the logits unchanged, and ``W_p`` matches
    an independent least-squares solution."""
    model = _model("llama").double()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[32:] = mlp.gate_proj.weight[:16]
        mlp.up_proj.weight[32:] = mlp.up_proj.weight[:16]
    batches = [_batch(4, 8, seed=s) for s in range(3)]
    junction = find_junction(model, "model.layers.0.mlp.down_proj:in")
    assert junction.producers == _producers("llama", 0)
    stats = collect_statistics(model, [junction.consumer], batches)[junction.consumer]

    reduced, (record,) = eliminate_neurons(model, junction.target, 32, stats=stats)
    assert record.p == 32 and record.kind == "gated"
    kept = torch.tensor(record.kept)
    assert torch.unique(kept % 32).numel() == 32  # never a neuron and its copy
    for batch in batches:
        torch.testing.assert_close(
            _logits(reduced, batch), _logits(model, batch), rtol=1e-9, atol=1e-9
        )

    X = []  # the consumer's input, K × n
    hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, 48)))
    for batch in batches:
        _logits(model, batch)
    hook.remove()
    X = torch.cat(X)
    A = torch.linalg.lstsq(X[:, kept], X).solution  # X ≈ X_S A, A: p × n
    W_p = reduced.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(W_p, mlp.down_proj.weight @ A.T, rtol=1e-7, atol=1e-9)

    # the same through reduce_junction on a copy, in float64 from the same statistics
    import copy

    other = copy.deepcopy(model)
    reduce_junction(other, junction, stats, 32, kept=kept)
    torch.testing.assert_close(other.model.layers[0].mlp.down_proj.weight, W_p)


class _SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
        self.down_proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _SparseMoeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 2)
        self.experts = nn.ModuleList([_SwiGLU(), _SwiGLU()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(x).softmax(-1)
        return sum(weights[..., i : i + 1] * e(x) for i, e in enumerate(self.experts))


class _Mismatched(_SwiGLU):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(8, 1)  # broadcasts: runs, but is no gated FFN of width 16


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _SwiGLU(), _SwiGLU()
        self.b.up_proj.weight = self.a.up_proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class _GateReadTwice(_SwiGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        return self.down_proj(torch.nn.functional.silu(g) * self.up_proj(x)) + g[..., :8]


@pytest.mark.parametrize(
    ("model", "target", "message"),
    [
        (_SparseMoeBlock(), "experts.0.gate_proj", "mixture-of-experts block"),
        (_Mismatched(), "gate_proj", "mismatched gate/up widths.*'up_proj': 1"),
        (_Tied(), "a.gate_proj", "weights tied to 'b.up_proj.weight'"),
        (_GateReadTwice(), "gate_proj", "gate read twice"),
    ],
    ids=["moe", "mismatched-widths", "tied", "gate-read-twice"],
)
@pytest.mark.parametrize("probed", [False, True])
def test_refusals_name_the_cause_and_leave_the_model_untouched(
    seed: int, model: nn.Module, target: str, message: str, probed: bool
) -> None:
    x = torch.randn(3, 4, 8)
    state = _state(model)
    if probed and isinstance(model, _GateReadTwice):
        message = "reaches the network output other than through its consumer"
    with pytest.raises(JunctionError, match=message):
        eliminate_neurons(model, target, 8, data=[x], example=x if probed else None)
    torch.testing.assert_close(_state(model), state, rtol=0, atol=0)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_the_search_reduces_gated_ffns_end_to_end() -> None:
    """ReductionSearch over every gated FFN of a tiny Llama: the sweep, the joint search and the
    energy model (RMS norms included) work on gated junctions, and applying the decision keeps a
    model that runs, with the uniform width in its config."""
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_neuronprune import EnergyModel, ModelIO, ReductionSearch, SearchSettings

    model = _model("llama")
    batches = [_batch(4, 8, seed=s) for s in (1, 2)]
    batches = [{**b, "labels": b["input_ids"]} for b in batches]
    targets = resolve_targets(model, "auto")
    stats = collect_statistics(model, [j.consumer for j in targets], batches)
    io = ModelIO(
        output_fn=lambda out: out.logits.reshape(-1, VOCAB),
        target_fn=lambda batch: batch["labels"].reshape(-1),
    )
    settings = SearchSettings(ranks=[40, 32], max_degradation=1.0)
    search = ReductionSearch(model, list(targets), stats, EnergyModel(), settings, io)
    metric = MulticlassAccuracy(VOCAB, average="micro")
    result = search.run(batches, metric, batches[0]["input_ids"][:1])
    assert set(result.decision.plan) == {_producers("llama", i)[0] for i in range(2)}
    elimination = search.apply(model, result.decision)
    assert {r.p for r in elimination.records} == {32}
    assert model.config.intermediate_size == 32
    assert _logits(model, _batch()).shape == (2, 8, VOCAB)


def test_explicit_targets_in_identical_blocks_are_probed_once() -> None:
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(4)]
    model = _model("llama", layers=4, intermediate=16)
    calls = []
    probe = JunctionProbe(model, _batch(1, 6))
    find = probe.find
    probe.find = lambda name: calls.append(name) or find(name)  # type: ignore[method-assign]
    assert len(find_junctions(model, names, probe=probe)) == 4
    assert calls == [names[0]]
    blocks = RepeatedBlocks(model)
    v = [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    with pytest.raises(JunctionError, match="mixes features|narrowed"):
        blocks.decide(v[0], lambda n: find_junction(model, n, probe=probe), None)  # type: ignore[arg-type]
    with pytest.raises(JunctionError, match="as in the identical block 'model.layers.0'"):
        blocks.decide(v[1], None, None)  # type: ignore[arg-type]
