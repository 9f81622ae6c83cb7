"""CausalLMPerplexity against Hugging Face's own shifted loss, padding and bad shapes."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_neuronprune import CausalLMPerplexity
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search.evaluation import batch_target
from lightning_neuronprune.search.metrics import causal_lm_nll


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_a_reference_shifted_cross_entropy(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=dtype)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 5:] = -100
    metric = CausalLMPerplexity()
    metric.update(logits[:2], labels[:2])
    metric.update(logits[2:], labels[2:])
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11).double(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert float(metric.compute()) == pytest.approx(math.exp(float(reference)), rel=1e-5)
    assert metric.higher_is_better is False


def test_matches_hugging_face_loss_with_padding() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=40, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16,
    )  # fmt: skip
    model = transformers.OPTForCausalLM(config).eval()
    ids = torch.randint(3, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = config.pad_token_id
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    target = batch_target(batch)  # padding becomes -100
    assert (target[1, 6:] == -100).all() and (target[0] == ids[0]).all()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=target)
    metric = CausalLMPerplexity()
    metric.update(out.logits, target)
    assert float(metric.compute()) == pytest.approx(math.exp(float(out.loss)), rel=1e-4)


def test_refuses_classifier_outputs_naming_the_shapes() -> None:
    with pytest.raises(NeuronEliminationError, match=r"logits \(4, 2\) and labels \(4,\)"):
        causal_lm_nll(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(NeuronEliminationError, match=r"\(2, 5, 3\) and labels \(2, 4\)"):
        CausalLMPerplexity().update(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
