"""Building the reduced modules and swapping them into a model.

Given a :class:`~lightning_neuronprune.structure.junction.Junction` (found by
:mod:`lightning_neuronprune.structure.discovery` or :mod:`lightning_neuronprune.structure.probe`),
the kept features
and the re-fitted consumer weight ``W_p`` (m × p), :func:`apply_reduction` swaps in:

* the producer with only the kept rows of its weight and bias (``kind="producer"``), and a
  ``BatchNorm1d`` between the two with only the kept features;
* in a gated junction (``kind="gated"``), every producer with only the kept rows (a fused
  ``gate_up_proj`` of 2n outputs keeps rows ``kept`` and ``n + kept``, so its halves stay
  aligned);
* the consumer with the new weight; where there is no producer row to delete (``kind="gather"``:
  the consumer reads the network input or a flattened conv output), a :class:`GatheredLinear`
  that selects the kept input features itself.

New layers are built without random initialisation (:func:`linear_from`) and take the computed
tensors as their parameters. Replaying a saved plan on a fresh model is
:func:`~lightning_neuronprune.structure.persistence.rebuild_shapes`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_neuronprune.structure.conv import reduced_conv_modules
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import (
    GatheredLinear,
    linear_from,
    replace_module,
    sliced_batchnorm,
)

__all__ = ["WIDTH_ATTRIBUTES", "apply_reduction", "update_config"]

log = logging.getLogger(__name__)

#: Configuration attributes that hold the FFN width (Llama, Mistral, Qwen2, Gemma, Phi-3: the
#: first; T5: ``d_ff``; OPT, BART: ``ffn_dim``).
WIDTH_ATTRIBUTES = ("intermediate_size", "d_ff", "ffn_dim")


def _reduced_producer(prod: nn.Linear, kept: Tensor) -> nn.Linear:
    idx = kept.to(prod.weight.device)
    bias = prod.bias.detach().index_select(0, idx) if prod.bias is not None else None
    weight = prod.weight.detach().index_select(0, idx)
    if isinstance(prod, GatheredLinear):
        return linear_from(
            weight, bias, index=prod.index, source_features=prod.source_features, like=prod
        )
    return linear_from(weight, bias, like=prod)


def _reduced_consumer(
    cons: nn.Linear, junction: Junction, kept: Tensor, W_p: Tensor, b_p: Tensor | None
) -> nn.Linear:
    # copies: the caller keeps its tensors, the model gets parameters of its own
    W_p = W_p.to(cons.weight, copy=True)
    b_p = b_p.to(cons.weight, copy=True) if b_p is not None else None
    if junction.kind == "gather":
        index = kept.to(cons.weight.device)
        source = cons.in_features
        if isinstance(cons, GatheredLinear):
            index, source = cons.index[index], cons.source_features
        return linear_from(W_p, b_p, index=index, source_features=source, like=cons)
    return linear_from(W_p, b_p, like=cons)


def apply_reduction(
    model: nn.Module, junction: Junction, kept: Tensor, W_p: Tensor, b_p: Tensor | None
) -> list[str]:
    """Swap the reduced producer, batch norm and consumer into ``model``, in place.

    Args:
        model: the network that holds the junction.
        junction: from :func:`find_junction`.
        kept: (p,) sorted indices of the kept features (of the consumer's input).
        W_p: (m × p) new consumer weight.
        b_p: (m,) new consumer bias, or ``None``.

    Returns:
        The names of the replaced modules.
    """
    if junction.kind == "conv":  # W_p: (m, p, *kernel), or (m, p·P) for a Linear consumer
        convs = reduced_conv_modules(model, junction, kept, W_p, b_p)
        for name, module in convs.items():
            replace_module(model, name, module)
        return list(convs)
    replaced: dict[str, nn.Module] = {}
    rows = junction.producer_rows(kept)
    for producer in junction.producers:
        replaced[producer] = _reduced_producer(model.get_submodule(producer), rows)
    if junction.batchnorm is not None:
        replaced[junction.batchnorm] = sliced_batchnorm(
            model.get_submodule(junction.batchnorm), kept
        )
    replaced[junction.consumer] = _reduced_consumer(
        model.get_submodule(junction.consumer), junction, kept, W_p, b_p
    )
    for name, module in replaced.items():
        replace_module(model, name, module)
    return list(replaced)


def _in_block(name: str) -> str:
    """The name inside the innermost numbered block: ``"mlp.down_proj"`` for
    ``"model.layers.3.mlp.down_proj"``, ``"DenseReluDense.wo"`` for T5's encoder and decoder."""
    return re.split(r"(?:^|\.)\d+\.", name)[-1]


def update_config(model: nn.Module, plan: Sequence[Mapping[str, Any]]) -> int | None:
    """Write the new FFN width into a Hugging Face ``model.config`` when every FFN has it.

    ``save_pretrained`` then writes a ``config.json`` from which ``from_pretrained`` builds the
    reduced shapes, so the reduced weights load as they are. The width is updated only when
    every consumer of the plan's junctions started at the config's width n (its
    ``intermediate_size``, ``d_ff`` or ``ffn_dim``), and every ``nn.Linear`` of the model with the
    same name inside its block (``mlp.down_proj``, BERT's ``output.dense``, T5's
    ``DenseReluDense.wo`` in encoder and decoder) now reads the same p features.
    With per-layer widths the config is left alone: reload with
    :func:`~lightning_neuronprune.structure.persistence.load_reduced`, which replays the plan.

    Args:
        model: the reduced model (anything without a ``config`` is left alone).
        plan: its plan records (``read_plan(model)``), in order.

    Returns:
        The width written, or ``None`` when the config was not changed.
    """
    config = getattr(model, "config", None)
    if config is None or not plan or any(rec.get("kind") == "conv" for rec in plan):
        return None  # a config's widths are FFN widths, not conv channels
    first: dict[str, Mapping[str, Any]] = {}
    for rec in plan:
        first.setdefault(rec["consumer"], rec)
    widths = {rec["n"] for rec in first.values()}
    attr = next(
        (a for a in WIDTH_ATTRIBUTES if len(widths) == 1 and getattr(config, a, None) in widths),
        None,
    )
    if attr is None:
        return None
    suffixes = {_in_block(name) for name in first}
    now = {
        m.in_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and _in_block(name) in suffixes
    }
    if len(now) != 1:
        log.info(
            "config.%s left at %s: the FFNs now have different widths %s; reload the model "
            "with load_reduced (the plan), not from_pretrained",
            attr, getattr(config, attr), sorted(now),
        )  # fmt: skip
        return None
    (p,) = now
    setattr(config, attr, p)
    return p
