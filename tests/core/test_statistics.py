from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neuronprune.core.batches import batch_input
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.errors import StatisticsError


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3))


def test_gram_and_sums_match_direct_computation(generator: torch.Generator) -> None:
    model = _mlp()
    xs = [torch.randn(7, 6, generator=generator) for _ in range(4)]
    stats = collect_statistics(model, ["3"], xs)["3"]
    H = torch.relu(model[0](torch.cat(xs))).double()
    torch.testing.assert_close(stats.gram, H.T @ H, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.total, H.sum(0))
    assert stats.count == 28
    assert stats.gram.dtype == torch.float64
    torch.testing.assert_close(stats.second_moment(centered=True), torch.cov(H.T, correction=0))


def test_batch_formats_and_input_fn(generator: torch.Generator) -> None:
    model = _mlp()
    x = torch.randn(10, 6, generator=generator)
    y = torch.zeros(10)
    ref = collect_statistics(model, ["3"], [x])["3"]
    for data, fn in (
        ([(x, y)], None),
        ([[x, y]], None),
        ([{"image": x, "label": y}], None),
        ([{"pixels": x}], lambda b: b["pixels"]),
    ):
        got = collect_statistics(model, ["3"], data, input_fn=fn)["3"]
        torch.testing.assert_close(got.gram, ref.gram)
    with pytest.raises(StatisticsError, match="keys \\['pixels'\\]"):
        batch_input({"pixels": x})


def test_max_samples_truncates_last_batch(generator: torch.Generator) -> None:
    model = _mlp()
    xs = [torch.randn(8, 6, generator=generator) for _ in range(5)]
    stats = collect_statistics(model, ["3"], xs, max_samples=20)["3"]
    assert stats.count == 20
    ref = collect_statistics(model, ["3"], [torch.cat(xs)[:20]])["3"]
    torch.testing.assert_close(stats.gram, ref.gram)


def test_hooks_removed_and_mode_restored_even_on_error() -> None:
    model = _mlp().train()
    bad = torch.full((4, 6), float("nan"))
    with pytest.raises(StatisticsError, match="non-finite activations .* layer '3'"):
        collect_statistics(model, ["3"], [bad])
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    collect_statistics(model, ["3"], [torch.randn(4, 6)])
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_sequence_inputs_are_flattened_to_rows(generator: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    x = torch.randn(3, 5, 4, generator=generator)
    stats = collect_statistics(model, ["2"], [x])["2"]
    assert stats.count == 15


def test_refusals() -> None:
    model = _mlp()
    with pytest.raises(StatisticsError, match="'1' is ReLU"):
        collect_statistics(model, ["1"], [torch.randn(2, 6)])
    with pytest.raises(StatisticsError, match="'nope' is not a module"):
        collect_statistics(model, ["nope"], [torch.randn(2, 6)])
    with pytest.raises(StatisticsError, match="data iterable was empty"):
        collect_statistics(model, ["3"], [])
    with pytest.raises(StatisticsError, match="`max_samples` must be a positive integer, got 0"):
        collect_statistics(model, ["3"], [torch.randn(2, 6)], max_samples=0)
    with pytest.raises(StatisticsError, match="no samples"):
        JunctionStatistics.zeros(3).mean()


def test_memory_is_independent_of_sample_count() -> None:
    stats = JunctionStatistics.zeros(16)
    before = {id(t) for t in (stats.gram, stats.total)}
    for _ in range(10):
        stats.update(torch.randn(1000, 16))
    assert {id(t) for t in (stats.gram, stats.total)} == before
    assert stats.gram.shape == (16, 16) and stats.count == 10_000


def test_restores_each_submodule_mode(generator: torch.Generator) -> None:
    """A BatchNorm frozen with ``.eval()`` inside a model in train mode stays frozen."""
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model.train()
    model[1].eval()
    collect_statistics(model, ["3"], [torch.randn(8, 6, generator=generator)])
    assert model.training and model[0].training and model[3].training
    assert not model[1].training


class _TokenModel(torch.nn.Module):
    """Per-token MLP on (B, T, 6) inputs, then mean pooling over tokens and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 10)
        self.fc2 = torch.nn.Linear(10, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["inputs_embeds"] if isinstance(batch, dict) else batch
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.head(h.mean(-2) if h.dim() == 3 else h)


def test_padded_batch_statistics_equal_unpadded_tokens(generator: torch.Generator) -> None:
    model = _TokenModel()
    lengths = [5, 2, 4]
    x = torch.randn(3, 5, 6, generator=generator)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    x[mask == 0] = 1e3  # padding holds garbage
    padded = [{"inputs_embeds": x, "attention_mask": mask, "labels": torch.zeros(3)}]
    tokens = x[mask.bool()]  # (11, 6): the same real tokens, unpadded, as a 2-D batch
    got = collect_statistics(model, ["fc2", "head"], padded)
    ref = collect_statistics(model, ["fc2"], [tokens])["fc2"]
    assert got["fc2"].count == ref.count == sum(lengths)
    torch.testing.assert_close(got["fc2"].gram, ref.gram)
    torch.testing.assert_close(got["fc2"].total, ref.total)
    # the pooled consumer's input (B, n) does not have the mask's shape: every row counts
    assert got["head"].count == 3
    # a user's mask function; `lambda b: None` counts the padding too
    custom = collect_statistics(
        model, ["fc2"], [(x, mask)], input_fn=lambda b: b[0], mask_fn=lambda b: b[1]
    )["fc2"]
    torch.testing.assert_close(custom.gram, ref.gram)
    everything = collect_statistics(model, ["fc2"], padded, mask_fn=lambda b: None)["fc2"]
    assert everything.count == 15


def test_hf_style_dict_batches_and_keyword_calls(generator: torch.Generator) -> None:
    class KeywordModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(20, 6)
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(input_ids) * attention_mask[..., None])

    ids = torch.randint(0, 20, (2, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    assert sorted(batch_input(batch)) == ["attention_mask", "input_ids"]
    stats = collect_statistics(KeywordModel(), ["fc"], [batch], max_samples=1)["fc"]
    assert stats.count == 7  # one sequence kept by `max_samples`, its 7 real tokens
    stats = collect_statistics(KeywordModel(), ["fc"], [batch])["fc"]
    assert stats.count == 10


def test_padding_mask_needs_no_host_read_per_batch(generator: torch.Generator, host_reads) -> None:
    """The padding mask weights the rows (masked rows add zero to G, the sums and the count)
    instead of selecting them with ``nonzero``: the reads of the host do not grow with the
    number of batches, and the statistics equal those of the real tokens alone."""
    model = _TokenModel()

    def batches(count: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(count):
            x = torch.randn(3, 5, 6, generator=generator)
            mask = (torch.rand(3, 5, generator=generator) < 0.6).long()
            x[mask == 0] = float("nan")  # padding holds garbage, even NaN
            out.append({"inputs_embeds": x, "attention_mask": mask})
        return out

    reads = []
    for count in (2, 6):
        data = batches(count)
        before = host_reads.count
        got = collect_statistics(model, ["fc2"], data)["fc2"]
        reads.append(host_reads.count - before)
        with torch.no_grad():
            H = torch.cat(
                [torch.relu(model.fc1(b["inputs_embeds"]))[b["attention_mask"] != 0] for b in data]
            ).double()
        assert got.count == H.shape[0]
        torch.testing.assert_close(got.gram, H.T @ H, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.total, H.sum(0), rtol=1e-12, atol=1e-12)
    assert reads[0] == reads[1]


def test_channel_statistics_take_every_position_and_no_mask(generator: torch.Generator) -> None:
    """A conv consumer's statistics are over its channels, every position a sample; a mask of
    another shape in the same batch does not touch them, while the token consumer is masked."""

    class ConvAndTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 2, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
            return self.conv(inputs_embeds.transpose(1, 2)), self.fc(inputs_embeds)

    x = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)  # (B, T, n)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[:, 3:] = 0
    model = ConvAndTokens().double()
    stats = collect_statistics(
        model, ["conv", "fc"], [{"inputs_embeds": x, "attention_mask": mask}]
    )
    rows = x.reshape(-1, 3)  # every position of the conv's (B, 3, T) input
    assert stats["conv"].count == 20
    torch.testing.assert_close(stats["conv"].gram, rows.T @ rows)
    real = x[:, :3].reshape(-1, 3)
    assert stats["fc"].count == 12
    torch.testing.assert_close(stats["fc"].gram, real.T @ real)


@pytest.mark.parametrize("tile", [3, 1024])
def test_normalize_keeps_the_moments_bit_for_bit(tile: int) -> None:
    g = torch.Generator().manual_seed(0)
    stats = JunctionStatistics.zeros(10)
    for _ in range(3):  # accumulated G: asymmetric in the last bits
        stats.update(torch.randn(7, 10, generator=g) * 3 + 1)
    M, mu = stats.second_moment(), stats.mean()
    gram = stats.gram
    assert stats.normalize_(tile=tile) is stats and stats.gram is gram  # in place
    assert stats.count == 1
    assert torch.equal(stats.gram, M) and torch.equal(stats.second_moment(), M)
    assert torch.equal(stats.mean(), mu)
