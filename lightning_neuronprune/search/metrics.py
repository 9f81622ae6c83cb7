"""Metrics for the search that torchmetrics does not ship in the form a reduction needs.

:class:`CausalLMPerplexity` is the perplexity of a causal language model on Hugging Face-style
batches: the logits at position t predict the label at position t + 1, and labels equal to
``ignore_index`` (-100, Hugging Face's convention, which the default target adapter also writes
where ``attention_mask`` is 0) are left out. Lower is better, so a budget such as
``max_degradation="5%"`` reads "perplexity may rise by 5 %".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_neuronprune.errors import NeuronEliminationError

__all__ = ["CausalLMPerplexity", "causal_lm_nll"]


def causal_lm_nll(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """The summed next-token negative log-likelihood and the number of predicted tokens.

    ``nll = Σ_{b, t} -log softmax(logits[b, t])[labels[b, t + 1]]`` over the pairs whose label is
    not ``ignore_index``, in float64.

    Args:
        logits: (B, T, V) scores of the next token at every position.
        labels: (B, T) token ids, ``ignore_index`` where nothing is to be predicted.
        ignore_index: the label that is skipped.

    Returns:
        ``(nll, count)``: a float64 scalar and an int64 scalar.

    Raises:
        NeuronEliminationError: naming both shapes, where ``logits`` is not (B, T, V) with
            ``labels`` (B, T), e.g. the output of a classifier rather than a causal LM.
    """
    if logits.ndim != 3 or labels.ndim != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise NeuronEliminationError(
            f"causal-LM perplexity needs logits of shape (B, T, V) and labels of shape (B, T), "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}; is the model a "
            "causal language model?"
        )
    scores = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1).long()
    keep = target != ignore_index
    nll = torch.nn.functional.cross_entropy(scores[keep], target[keep], reduction="sum").double()
    return nll, keep.sum()


class CausalLMPerplexity(Metric):
    """``exp(Σ nll / Σ count)`` over all batches (see :func:`causal_lm_nll`), for the logits
    (B, T, V) of a causal LM and its labels (B, T).

    Args:
        ignore_index: the label left out (Hugging Face's -100).
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = CausalLMPerplexity()
        >>> metric.update(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))
        >>> round(float(metric.compute()), 4)  # uniform scores over 4 tokens
        4.0
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    nll: Tensor
    count: Tensor

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        nll, count = causal_lm_nll(preds, target, self.ignore_index)
        self.nll += nll.to(self.nll.device)
        self.count += count.to(self.count.device)

    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.count.clamp_min(1))
