"""Compensating re-fits: reduce one junction of an already reduced network so that the consumer's
output matches the *original* network's.

Eq. 6 fits the kept features to the dropped ones on the statistics of one network. When several
junctions are reduced in turn, the input ``X̃`` a later consumer sees in the reduced network is not
the input ``X`` it saw in the original one: earlier reductions have perturbed it. Re-collecting
``G̃ = X̃ X̃ᵀ`` and re-applying Eq. 6 (the plain data-driven refit) reconstructs ``X̃`` and so keeps
the earlier errors. A compensating fit targets the original consumer output instead:

    min over W_p of  ‖W X - W_p X̃_S‖²_F   ⇒   W_p = W C[:, S] G̃[S, S]⁻¹,   C = X X̃ᵀ (n × n),

where both networks run on the same samples. The selection is the output-aware greedy of
:func:`~lightning_neuronprune.core.selection.output_order` with the cross moment: adding feature j
explains ``‖W (C - C[:, S] G̃[S, S]⁻¹ G̃[S, :])[:, j]‖² / R̃[j, j]`` more of ``‖W X‖²``. With no
earlier reduction (``X̃ = X``) all of it is exactly Eq. 6 and the ``"output"`` method.

Only second moments are kept (``G̃``, ``C`` and the sums), O(n²) memory, all-reduced under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.conv import reconstruct_channels, tap_matrix
from lightning_neuronprune.core.reconstruction import Reconstruction, solve_psd
from lightning_neuronprune.core.selection import greedy_output, output_factor
from lightning_neuronprune.core.statistics import (
    CHANNEL_CONSUMERS,
    JunctionStatistics,
    batch_input,
    channel_rows,
    model_device,
)
from lightning_neuronprune.errors import StatisticsError
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.surgery import apply_reduction

__all__ = [
    "CrossStatistics",
    "collect_cross_statistics",
    "compensated_order",
    "compensate_junction",
]


@dataclass
class CrossStatistics:
    """Second moments of a consumer's input in the reduced network (``X̃``) and across networks.

    Attributes:
        reduced: statistics of ``X̃`` (``G̃ = X̃ X̃ᵀ``, sums, count).
        cross: ``C = Σ_k x_k x̃_kᵀ`` (n × n, float64): original input times reduced input.
    """

    reduced: JunctionStatistics
    cross: Tensor

    @property
    def num_features(self) -> int:
        return self.reduced.num_features


def collect_cross_statistics(
    original: nn.Module,
    reduced: nn.Module,
    consumer: str,
    data: Iterable[Any],
    *,
    max_samples: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
    channels: int | None = None,
) -> CrossStatistics:
    """Run both networks on the same batches and stream ``G̃`` and ``C`` at ``consumer``'s input.

    Both models run in ``eval()`` under ``torch.no_grad()``; their modes are restored and the hooks
    removed afterwards, also on error. ``consumer`` must read the same n features in both (it is
    the junction about to be reduced, untouched so far in ``reduced``). A conv consumer's moments
    are over its input channels, every position a sample; so are an ``nn.Linear``'s when
    ``channels`` gives n for its flattened ``(n, *spatial)`` input (a conv junction).
    """
    device = torch.device(device) if device is not None else model_device(original)
    mods = [m.get_submodule(consumer) for m in (original, reduced)]
    widths = [getattr(m, "in_features", getattr(m, "in_channels", None)) for m in mods]
    if (
        not all(isinstance(m, (nn.Linear, *CHANNEL_CONSUMERS)) for m in mods)
        or type(mods[0]) is not type(mods[1])
        or widths[0] != widths[1]
    ):
        raise StatisticsError(
            f"{consumer!r} must be an nn.Linear or a conv reading the same features in both "
            f"networks, got {[type(m).__name__ for m in mods]}"
        )
    conv = isinstance(mods[0], CHANNEL_CONSUMERS)
    n = widths[0] if channels is None or conv else channels
    stats = JunctionStatistics.zeros(n, device)
    cross = torch.zeros(n, n, dtype=torch.float64, device=device)
    captured: list[Tensor | None] = [None, None]

    def make_hook(slot: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if conv or channels is not None:  # channels: every position a sample
                captured[slot] = channel_rows(x, n).to(device, torch.float64)
                return
            index = getattr(module, "index", None)
            if isinstance(index, Tensor):
                x = x.index_select(-1, index)
            captured[slot] = x.reshape(-1, x.shape[-1]).to(device, torch.float64)

        return hook

    get_input = input_fn if input_fn is not None else batch_input
    modes = [(m, m.training) for model in (original, reduced) for m in model.modules()]
    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(mods)]
    seen = 0
    try:
        original.eval()
        reduced.eval()
        with torch.no_grad():
            for batch in data:
                x = get_input(batch)
                x = x.to(device) if isinstance(x, Tensor) else x
                if max_samples is not None and isinstance(x, Tensor):
                    x = x[: max_samples - seen]
                original(x)
                reduced(x)
                X, Xr = captured
                if X is None or Xr is None or X.shape != Xr.shape:
                    raise StatisticsError(f"{consumer!r} was not called alike in both networks")
                if not (torch.isfinite(X).all() and torch.isfinite(Xr).all()):
                    raise StatisticsError(f"non-finite activations at the input of {consumer!r}")
                stats.update(Xr)
                cross += X.T @ Xr
                seen += x.shape[0] if isinstance(x, Tensor) else 1
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if stats.count == 0:
        raise StatisticsError(f"no sample reached {consumer!r}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stats.all_reduce()
        torch.distributed.all_reduce(cross)
    return CrossStatistics(stats, cross)


def compensated_order(cs: CrossStatistics, weight: Tensor, *, steps: int | None = None) -> Tensor:
    """Output-aware greedy order on the cross moments (see the module doc); ``(n,)`` LongTensor.

    The same recursion as :func:`~lightning_neuronprune.core.selection.output_order`, started from
    ``V = W C`` instead of ``W G``: ``R`` is the Schur complement of ``G̃``, and ``V = W C_res``
    follows it with the same rank-one updates. Sync-free, nested in p.
    """
    G = cs.reduced.gram
    n = G.shape[0]
    steps = n if steps is None else max(0, min(int(steps), n))
    if weight.dim() > 2 or weight.shape[1] != n:  # a conv junction: its taps stacked as rows
        weight = tap_matrix(weight, n)
    F = output_factor(weight, n, G)
    return greedy_output(G, F @ cs.cross, steps, n * torch.finfo(torch.float32).eps)


def compensate_junction(
    reduced: nn.Module,
    junction: Junction,
    cs: CrossStatistics,
    p: int,
    *,
    kept: Tensor | None = None,
) -> Tensor:
    """Reduce ``junction`` of ``reduced`` in place to p features with the compensating fit.

    Args:
        reduced: the network being reduced (its consumer still reads all n features).
        junction: the junction.
        cs: cross statistics from :func:`collect_cross_statistics`.
        p: features to keep.
        kept: keep these instead of selecting with :func:`compensated_order`.

    Returns:
        The sorted kept indices (p,).
    """
    consumer = reduced.get_submodule(junction.consumer)
    n = cs.num_features
    if not 1 <= p <= n:
        raise ValueError(f"`p` must be in [1, {n}], got {p!r}")
    if kept is None:
        kept = compensated_order(cs, consumer.weight, steps=p)[:p]
    kept = torch.sort(kept.to(cs.cross.device, torch.long)).values
    G = cs.reduced.gram
    T = solve_psd(G[kept][:, kept], cs.cross[:, kept])  # (n × p)
    if junction.kind == "conv":  # every tap: W_p[:, s, t] = Σ_j W[:, j, t] T[j, s]
        W_p, b_p = reconstruct_channels(consumer.weight, consumer.bias, Reconstruction(T, None))
    else:
        W = consumer.weight.detach().to(T)
        W_p = (W @ T).to(consumer.weight.device, consumer.weight.dtype)
        b_p = consumer.bias.detach().clone() if consumer.bias is not None else None
    apply_reduction(reduced, junction, kept.to(consumer.weight.device), W_p, b_p)
    return kept
