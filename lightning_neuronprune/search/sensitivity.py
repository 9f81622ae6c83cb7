"""How much the loss cares about each output of each consumer: the diagonal Fisher information.

Re-fitting a consumer on p of its n input features changes its output by ``e = W (x - T x_S)``.
To second order, the expected loss then grows by ``ΔL ≈ ½ E[eᵀ H e]``; with the empirical Fisher
``F = E[g gᵀ]`` of the consumer output ``y`` (``g = ∂ℓ/∂y`` per sample) for the Hessian, its
diagonal for ``F``, and the error independent of the gradient::

    ΔL(S) ≈ ½ Σ_k F_kk (W R_S Wᵀ)_kk,    R_S = M - M[:, S] M[S, S]⁻¹ M[S, :]

with ``M`` the consumer input's second moment and ``R_S`` what the fit leaves unexplained. This is
the loss-weighted proxy of :mod:`~lightning_neuronprune.search.allocation`: unlike the share of a
consumer's own output energy, it is in the same units (the loss) for every junction, so it says
which layer can lose features at the least cost to the network. The diagonal costs one backward
pass over a few calibration batches: :func:`output_sensitivity`.

The gradient at a consumer's output is read without parameter gradients: each consumer's output
gets a zero tensor added that requires grad, and ``torch.autograd.grad`` differentiates the loss
with respect to those zeros only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.batches import batch_input, call_model
from lightning_neuronprune.core.runtime import evaluating, model_device, to_device
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search.evaluation import batch_target, model_output
from lightning_neuronprune.search.metrics import CausalLMPerplexity, causal_lm_nll

__all__ = ["default_loss", "output_sensitivity", "proxy_sensitivity"]

LossFn = Callable[[Tensor, Any], Tensor]


def default_loss(metric: Any = None) -> LossFn:
    """The loss whose gradients weigh the outputs: ``(predictions, target) -> summed loss``.

    * with :class:`~lightning_neuronprune.search.metrics.CausalLMPerplexity`: the summed
      next-token negative log-likelihood (labels of -100 left out);
    * class scores (B, C, ...) with integer targets (B, ...): the summed cross-entropy (targets
      of -100 left out);
    * a floating target of the predictions' shape: half the summed squared error.

    Raises (when called):
        NeuronEliminationError: naming both shapes, for any other pair; pass ``loss_fn``.
    """
    if isinstance(metric, CausalLMPerplexity):
        ignore = metric.ignore_index
        return lambda preds, target: causal_lm_nll(preds, target, ignore)[0]

    def loss(preds: Tensor, target: Any) -> Tensor:
        if isinstance(target, Tensor) and preds.is_floating_point():
            if not target.is_floating_point() and preds.ndim == target.ndim + 1:
                scores = preds.float().movedim(-1, 1) if preds.ndim > 2 else preds.float()
                return nn.functional.cross_entropy(
                    scores, target.long(), ignore_index=-100, reduction="sum"
                )
            if target.is_floating_point() and target.shape == preds.shape:
                return 0.5 * (preds.float() - target.float()).pow(2).sum()
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise NeuronEliminationError(
            f"no default loss for predictions of shape {tuple(preds.shape)} and target {shape}; "
            "pass `loss_fn` (predictions, target) -> scalar"
        )

    return loss


def _feature_dim(module: nn.Module) -> int:
    """The dimension of a consumer's output that holds its m outputs (channels of a conv)."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def output_sensitivity(
    model: nn.Module,
    consumers: Sequence[str],
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    max_rows: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    target_fn: Callable[[Any], Any] | None = None,
    output_fn: Callable[[Any], Tensor] | None = None,
    transfer: Callable[[Any], Any] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> dict[str, Tensor]:
    """The diagonal Fisher ``F_kk = E[(∂ℓ/∂y_k)²]`` of each consumer's output y, (m,) float64.

    Each batch runs forward with gradients (in eval mode, parameters untouched), ``loss_fn``
    gives the summed loss of its samples, and the squared gradient at every consumer output is
    summed over everything but the output dimension (samples, tokens, positions). The sums are
    divided by the number of rows of the first consumer's output (tokens for a language model,
    samples for an MLP, positions for a conv), summed over the ranks of a process group.

    Args:
        model: the network.
        consumers: qualified names of the consumer modules.
        batches: the data (raw batches).
        loss_fn: ``(predictions, target) -> scalar`` loss summed over the batch (see
            :func:`default_loss`).
        max_rows: stop after the batch at which the first consumer's output rows reach this.
        input_fn, target_fn, output_fn: the batch adapters (defaults as the evaluation's).
        transfer: moves a batch to the device (default: the model's device).
        forward_context: what the forward passes run under (e.g. autocast).

    Returns:
        ``{consumer: F}``, each (m,) float64 on the model's device.

    Raises:
        NeuronEliminationError: the data is empty, or no gradient reaches a consumer.
    """
    device = model_device(model)
    modules = {name: model.get_submodule(name) for name in consumers}
    sums: dict[str, Tensor] = {}
    zeros: dict[str, Tensor] = {}
    get_input, get_target = input_fn or batch_input, target_fn or batch_target
    output = output_fn or model_output

    def hook(name: str) -> Callable[[nn.Module, Any, Tensor], Tensor]:
        def add_zero(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            zeros[name] = torch.zeros_like(out, requires_grad=True)
            return out + zeros[name]

        return add_zero

    grads = [p.requires_grad for p in model.parameters()]
    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    seen = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with evaluating(model), torch.enable_grad():
            for batch in batches:
                moved = transfer(batch) if transfer is not None else to_device(batch, device)
                zeros.clear()
                with (forward_context or nullcontext)():
                    preds = output(call_model(model, get_input(moved)))
                loss = loss_fn(preds, get_target(moved))
                missing = [name for name in consumers if name not in zeros]
                if missing:
                    raise NeuronEliminationError(
                        f"the consumers {missing} did not run in the forward pass"
                    )
                tensors = [zeros[name] for name in consumers]
                gs = torch.autograd.grad(loss, tensors, allow_unused=True)
                for name, g in zip(consumers, gs, strict=True):
                    if g is None:
                        raise NeuronEliminationError(
                            f"the loss does not depend on the output of {name!r}"
                        )
                    dim = _feature_dim(modules[name]) % g.ndim
                    other = [d for d in range(g.ndim) if d != dim]
                    sq = g.detach().double().pow(2).sum(other)
                    sums[name] = sums[name] + sq if name in sums else sq
                first = zeros[consumers[0]]
                n_rows = first.numel() // first.shape[_feature_dim(modules[consumers[0]])]
                seen += n_rows
                if max_rows is not None and seen >= max_rows:
                    break
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
    if not sums:
        raise NeuronEliminationError("the data for the loss sensitivity is empty")
    rows = torch.tensor(float(seen), dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in (*sums.values(), rows):
            torch.distributed.all_reduce(t)
    return {name: s / rows.clamp_min(1) for name, s in sums.items()}


def proxy_sensitivity(
    model: nn.Module,
    consumers: Sequence[str],
    sources: Sequence[Iterable[Any]],
    metric: Any,
    max_rows: int,
    *,
    loss_fn: LossFn | None = None,
    warn: Callable[[str], None] = warnings.warn,
    **options: Any,
) -> dict[str, Tensor] | None:
    """:func:`output_sensitivity` for the allocate strategy's ``"loss"`` proxy, with ``loss_fn``
    or the :func:`default_loss` of ``metric``, on the first of ``sources`` (e.g. the statistics
    data, then the evaluation data) whose batches it can score: training batches without targets
    pass on to the next. ``None`` with a warning where none fits (the ``"energy"`` proxy is then
    used); an error of a given ``loss_fn`` is raised. ``options`` go to
    :func:`output_sensitivity`."""
    error: NeuronEliminationError | None = None
    for batches in sources:
        try:
            return output_sensitivity(
                model, consumers, batches, loss_fn or default_loss(metric), max_rows=max_rows,
                **options,
            )  # fmt: skip
        except NeuronEliminationError as e:
            if loss_fn is not None:
                raise
            error = e
    warn(
        f"neuron elimination: {error}; the allocation uses the 'energy' proxy (pass "
        "`DataOptions(loss_fn=...)` for the 'loss' proxy)"
    )
    return None
