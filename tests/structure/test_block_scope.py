"""The probe at block scope: one block run alone on its recorded arguments gives the whole
model's verdicts, and a block that does not replay, or a perturbation that leaves its block,
sends the probe back to the whole model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformer_blocks import Encoder, SwiGLU, TimmBlock

import lightning_neuronprune.structure.probe_passes as probe_passes
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.block_scope import first_blocks, state_tensors
from lightning_neuronprune.structure.junction import linear_layer_names
from lightning_neuronprune.structure.probe import JunctionProbe


def _verdicts(model: nn.Module, example: Any) -> tuple[dict[str, Any], JunctionProbe]:
    """Every nn.Linear's verdict: the junction found (without its pass count) or refused."""
    probe = JunctionProbe(model, example)
    verdicts: dict[str, Any] = {}
    for name in linear_layer_names(model):
        try:
            r = probe.find(name)
        except JunctionError:
            verdicts[name] = "refused"
        else:
            verdicts[name] = (r.consumer, r.batchnorm, r.path, r.producers, r.fused)
    return verdicts, probe


def _hf(kind: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=40, max_position_embeddings=16)
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        config = transformers.T5Config(
            d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, vocab_size=40,
        )  # fmt: skip
        batch["decoder_input_ids"] = ids
        return transformers.T5ForConditionalGeneration(config).eval(), batch
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            **common,
        )  # fmt: skip
        return transformers.BertModel(config).eval(), batch
    config_type = {"llama": transformers.LlamaConfig, "phi3": transformers.Phi3Config}[kind]
    config = config_type(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).eval(), batch


@pytest.mark.parametrize("kind", ["llama", "phi3", "t5", "bert", "encoder"])
def test_block_scope_gives_the_whole_models_verdicts(
    seed: int, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    if kind == "encoder":
        model: nn.Module = Encoder(
            [TimmBlock(), TimmBlock(mlp=SwiGLU(16, 32))], untraceable=True
        ).eval()
        example: Any = torch.randn(3, 5, 6)
    else:
        model, example = _hf(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scoped, probe = _verdicts(model, example)
    assert probe.block_passes > 0 and probe.cost < probe.passes
    monkeypatch.setattr(probe_passes, "first_blocks", lambda model: {})  # the whole model only
    whole, reference = _verdicts(model, example)
    assert reference.block_passes == 0 and reference.full_passes == reference.passes
    assert scoped == whole
    assert any(v != "refused" for v in scoped.values())
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)


class Scaled(nn.Module):
    """An FFN block scaled by an attribute that the model sets only while it runs: run alone,
    it gives other values, so it cannot be replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x + self.fc2(F.gelu(self.fc1(x))))


class Stash(nn.Module):
    """An FFN block that also writes its hidden features into a dict it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)

    def forward(self, x: torch.Tensor, store: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        store["h"] = h
        return x + self.fc2(h)


class Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block])
        self.side = nn.Linear(12, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            if isinstance(block, Stash):
                x = block(x, store)
            else:
                block.scale = 2.0
                x = block(x)
                block.scale = 1.0
        if "h" in store:  # the stashed features are read again, outside the block
            x = x + self.side(store["h"])
        return self.head(x)


def test_a_block_that_does_not_replay_is_probed_whole(seed: int) -> None:
    model = Net(Scaled())
    probe = JunctionProbe(model, torch.randn(4, 6))
    assert probe.find("blocks.0.fc1").consumer == "blocks.0.fc2"
    assert probe.block_passes == 1  # the replay, which differs from the baseline
    assert probe.full_passes == probe.passes - 1


def test_features_written_into_an_argument_leave_the_block(seed: int) -> None:
    """Inside the block fc1 feeds fc2 alone, but it also writes into its ``store`` argument,
    which the model reads again: the whole model decides (two consumers)."""
    model = Net(Stash())
    probe = JunctionProbe(model, torch.randn(4, 6))
    with pytest.raises(JunctionError, match=r"feeds 2 nn.Linear layers \['blocks.0.fc2', 'side'\]"):
        probe.find("blocks.0.fc1")
    assert probe.block_passes > 1 and probe.full_passes > 1


def test_first_blocks_and_state_tensors() -> None:
    model = Encoder([TimmBlock(), TimmBlock(), TimmBlock(mlp=SwiGLU(16, 32)), TimmBlock()])
    assert first_blocks(model) == {"blocks.0": 0.25, "blocks.2": 0.25}

    class Holder:
        def __init__(self) -> None:
            self.keys = [torch.ones(2), torch.zeros(3)]
            self.me = self

    t = torch.arange(4)
    assert [x.numel() for x in state_tensors(((t, Holder()), {"a": t, "m": nn.Linear(2, 2)}))] == [
        4,
        2,
        3,
    ]


def _deep_encoder(depth: int) -> Encoder:
    torch.manual_seed(0)
    return Encoder([TimmBlock() for _ in range(depth)], untraceable=True).eval()


def test_block_passes_read_the_host_once_per_pass(seed: int, host_reads) -> None:
    """A block pass reads the changed features and whether the block's output or arguments
    changed in one read; the reads of a find do not grow with the number of blocks."""
    x = torch.randn(2, 5, 6)
    reads, results = [], []
    for depth in (2, 6):
        probe = JunctionProbe(_deep_encoder(depth), x)
        before = dict(host_reads.counts)
        results.append(probe.find("blocks.0.mlp.fc1"))
        reads.append(
            sum(host_reads.counts[k] - before.get(k, 0) for k in ("__float__", "item", "cpu"))
        )
        assert probe.full_passes == 1  # the baseline only
    assert results[0] == results[1]
    assert reads[0] == reads[1]
