"""The callback with the budgeted allocation strategy on many junctions, and a causal language
model under a relative perplexity budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from lit_models import BlobsData, applied, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import (
    CausalLMPerplexity,
    ConfirmSettings,
    JointSettings,
    NeuronEliminationCallback,
)
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search.evaluation import batch_target

BLOCKS = 30


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        nn.init.normal_(self.fc2.weight, std=0.3 / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class LitDeep(pl.LightningModule):
    """30 residual MLP blocks on blobs: 30 plain junctions fc1 → fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(12, 16) for _ in range(BLOCKS)))
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class CountingAccuracy(MulticlassAccuracy):
    computes = 0

    def compute(self) -> torch.Tensor:
        type(self).computes += 1
        return super().compute()


def test_allocate_reduces_30_junctions_within_20_evaluations(tmp_path: Path, seed: int) -> None:
    confirm = ConfirmSettings(confidence=None, reserve=0.0)
    callback = NeuronEliminationCallback(
        targets=[f"blocks.{i}.fc1" for i in range(BLOCKS)], max_degradation=0.03,
        joint=JointSettings("allocate", max_evaluations=20), confirm=confirm,
        metric=CountingAccuracy(4, average="micro"),
    )  # fmt: skip
    CountingAccuracy.computes = 0
    model = LitDeep()
    tiny_trainer(tmp_path, callback, max_epochs=3).fit(model, datamodule=BlobsData())
    result = callback.result
    assert result is not None and _unswept(result)
    assert 1 <= len(result.joint_points) <= 20
    # the baseline, the search, then the held-out baseline and each confirmed candidate
    expected = 1 + len(result.joint_points) + 1 + len(result.confirmations)
    assert CountingAccuracy.computes == expected
    print(f"callback, {BLOCKS} junctions: {CountingAccuracy.computes} evaluations in all")
    assert result.decision.chosen.accuracy_drop <= result.budget
    plan = applied(callback)
    assert len(plan) >= 10
    for layer, p in plan.items():
        assert model.get_submodule(layer).out_features == p


def _unswept(result: Any) -> bool:
    """Whether every layer's points are its unreduced baseline alone (no per-layer sweep)."""
    return all(len(pts) == 1 and pts[0].p == pts[0].n for pts in result.points.values())


# ------------------------------------------------------------------ causal language models


def _tokens(n: int, length: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (each token the previous plus one, modulo the vocabulary), padded on
    the right with ``labels = input_ids`` (pad tokens included: the adapter masks them)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, vocab, (n, 1), generator=g)
    ids = 3 + (start - 3 + torch.arange(length)) % (vocab - 3)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 1)  # OPT's pad token
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].clone()} for i in range(n)
    ]


class TokenSequences(pl.LightningDataModule):
    def __init__(self, vocab: int = 40) -> None:
        super().__init__()
        self.train, self.val = _tokens(256, 16, vocab, 1), _tokens(128, 16, vocab, 2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=32)


class LitCausalLM(pl.LightningModule):
    """A tiny random-init OPT (FFNs fc1 → ReLU → fc2, plain ``nn.Linear``) on dict batches."""

    def __init__(self, vocab: int = 40, layers: int = 2) -> None:
        super().__init__()
        import transformers

        config = transformers.OPTConfig(
            vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32,
        )  # fmt: skip
        self.lm = transformers.OPTForCausalLM(config)

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def training_step(self, batch, batch_idx):
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
        return self.lm(**{**batch, "labels": labels}).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.parametrize(("joint", "confirm"), [("allocate", False), ("greedy", True)])
def test_relative_perplexity_budget_end_to_end(
    tmp_path: Path, seed: int, joint: str, confirm: bool
) -> None:
    pytest.importorskip("transformers")
    targets = [f"lm.model.decoder.layers.{i}.fc1" for i in range(2)]
    callback = NeuronEliminationCallback(
        targets=targets, ranks=[48, 32, 24, 16, 8], max_degradation="5%",
        joint=joint, metric=CausalLMPerplexity(),
        confirm=ConfirmSettings(confidence=None, reserve=0.0) if confirm else None,
    )  # fmt: skip
    model, data = LitCausalLM(), TokenSequences()
    tiny_trainer(tmp_path, callback, max_epochs=4).fit(model, datamodule=data)
    result = callback.result
    assert result is not None
    baseline = next(iter(result.points.values()))[0].accuracy  # the unreduced perplexity
    assert baseline < 20  # the model learnt the sequences (uniform guessing gives 40)
    assert result.budget == pytest.approx(0.05 * baseline, rel=1e-6)
    chosen = result.decision.chosen
    print(f"{joint}: perplexity {baseline:.3f}, budget {result.budget:.4f}, chosen {chosen.label}")
    assert chosen is not None and applied(callback)
    # higher is worse: the rise of perplexity is the degradation
    assert chosen.accuracy == pytest.approx(baseline + chosen.accuracy_drop, rel=1e-6)
    assert chosen.accuracy_drop <= result.budget
    for layer, p in applied(callback).items():
        assert model.get_submodule(layer).out_features == p
    model.eval()
    metric = CausalLMPerplexity()
    with torch.no_grad():
        for batch in data.val_dataloader():
            out = model(batch)
            assert out.logits.shape == (*batch["input_ids"].shape, 40)
            metric.update(out.logits, batch_target(batch))
    if not confirm:  # the whole validation set was the search part: applied as evaluated
        assert float(metric.compute()) == pytest.approx(chosen.accuracy, rel=1e-5)


def test_perplexity_on_a_classifier_names_the_shapes_and_leaves_the_model(
    tmp_path: Path, seed: int
) -> None:
    pytest.importorskip("transformers")
    from lit_models import LitTinyBert, TokenData

    callback = NeuronEliminationCallback(
        targets="auto", max_degradation="5%", joint="allocate", metric=CausalLMPerplexity()
    )
    model = LitTinyBert()
    states: list[dict[str, torch.Tensor]] = []

    class Snapshot(pl.Callback):  # the trained weights, before the elimination callback
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = tiny_trainer(tmp_path, [Snapshot(), callback], max_epochs=1)
    with pytest.raises(NeuronEliminationError, match=r"logits \(\d+, 2\) and labels \(\d+,\)"):
        trainer.fit(model, datamodule=TokenData())
    after = model.state_dict()
    assert after.keys() == states[0].keys()
    assert all(torch.equal(after[k].cpu(), v.cpu()) for k, v in states[0].items())


class LitLlama(LitCausalLM):
    """A tiny random-init Llama (gated SwiGLU FFNs) on the same dict batches."""

    def __init__(self, vocab: int = 40, layers: int = 3) -> None:
        pl.LightningModule.__init__(self)
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
            pad_token_id=1,
        )  # fmt: skip
        self.lm = transformers.LlamaForCausalLM(config)


def test_gated_llama_under_a_relative_perplexity_budget(tmp_path: Path, seed: int) -> None:
    """``targets="auto"`` finds every SwiGLU FFN, the allocation search spends a handful of
    evaluations, and the reduced model's perplexity on the search data is the evaluated one."""
    pytest.importorskip("transformers")
    CountingPerplexity.computes = 0
    callback = NeuronEliminationCallback(
        targets="auto", max_degradation="5%", metric=CountingPerplexity(), confirm=None,
        joint=JointSettings(strategy="allocate", max_evaluations=8),
    )  # fmt: skip
    model, data = LitLlama(), TokenSequences()
    tiny_trainer(tmp_path, callback, max_epochs=4).fit(model, datamodule=data)
    result = callback.result
    assert result is not None
    gates = {f"lm.model.layers.{i}.mlp.gate_proj" for i in range(3)}
    assert set(result.points) == gates  # the attention projections are not junctions
    assert CountingPerplexity.computes == 1 + len(result.joint_points) <= 1 + 8
    chosen = result.decision.chosen
    assert chosen is not None and chosen.accuracy_drop <= result.budget
    for layer, p in applied(callback).items():
        mlp = model.get_submodule(layer.rsplit(".", 1)[0])
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == p
        assert mlp.down_proj.in_features == p
    model.eval()
    check = CausalLMPerplexity()
    with torch.no_grad():
        for batch in data.val_dataloader():
            check.update(model(batch).logits, batch_target(batch))
    assert float(check.compute()) == pytest.approx(chosen.accuracy, rel=1e-5)


class CountingPerplexity(CausalLMPerplexity):
    computes = 0

    def compute(self) -> torch.Tensor:
        type(self).computes += 1
        return super().compute()
