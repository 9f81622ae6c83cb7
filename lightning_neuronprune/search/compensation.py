"""Compensating re-fits: reduce one junction of an already reduced network so that the consumer's
output matches the *original* network's.

Eq. 6 fits the kept features to the dropped ones on the statistics of one network. When several
junctions are reduced in turn, the input ``X̃`` a later consumer sees in the reduced network is not
the input ``X`` it saw in the original one: earlier reductions have perturbed it. Re-collecting
``G̃ = X̃ X̃ᵀ`` and re-applying Eq. 6 (the plain data-driven refit) reconstructs ``X̃`` and so keeps
the earlier errors. A compensating fit targets the original consumer output instead:

    min over W_p of  ‖W X - W_p X̃_S‖²_F   ⇒   W_p = W C[:, S] G̃[S, S]⁻¹,   C = X X̃ᵀ (n × n),

where both networks run on the same samples. With the affine option the fit has an intercept,
``W X + b ≈ W_p X̃_S + b_p``: the same formula on the centred moments ``G̃ - K μ̃ μ̃ᵀ`` and
``C - K μ μ̃ᵀ`` (``μ``, ``μ̃``: the feature means of ``X`` and ``X̃``), and
``b_p = b + W (μ - T μ̃_S)``, which is folded into a new bias where the consumer had none. The
selection is the output-aware greedy of
:func:`~lightning_neuronprune.core.selection.output_order` with the cross moment: adding feature j
explains ``‖W (C - C[:, S] G̃[S, S]⁻¹ G̃[S, :])[:, j]‖² / R̃[j, j]`` more of ``‖W X‖²``. With no
earlier reduction (``X̃ = X``) all of it is exactly Eq. 6 and the ``"output"`` method.

Only second moments are kept (``G̃``, ``C`` and the sums of ``X̃`` and ``X``), O(n²) memory,
all-reduced under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.conv import reconstruct_channels, tap_matrix
from lightning_neuronprune.core.reconstruction import (
    Reconstruction,
    reconstruct_consumer,
    solve_psd,
)
from lightning_neuronprune.core.recording import (
    CHANNEL_CONSUMERS,
    all_reduce,
    stream_inputs,
)
from lightning_neuronprune.core.runtime import model_device
from lightning_neuronprune.core.selection import greedy_output, output_factor
from lightning_neuronprune.core.statistics import JunctionStatistics
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
        original_total: ``s = Σ_k x_k`` (n,), float64: the sums of the original input, needed
            by the affine fit; ``None`` when not collected.
    """

    reduced: JunctionStatistics
    cross: Tensor
    original_total: Tensor | None = None

    @property
    def num_features(self) -> int:
        return self.reduced.num_features

    def moments(self, centered: bool = False) -> tuple[Tensor, Tensor]:
        """The normal matrix and the cross moment of the fit, ``(G̃, C)``, each (n × n) float64.

        With ``centered`` (the affine fit), the centred moments per sample,
        ``(G̃ / K - μ̃ μ̃ᵀ, C / K - μ μ̃ᵀ)``.

        Raises:
            StatisticsError: ``centered`` without the original sums, or no samples.
        """
        if not centered:
            return self.reduced.gram, self.cross
        if self.original_total is None:
            raise StatisticsError(
                "the affine compensating fit needs the sums of the original input "
                "(`original_total`), which these cross statistics lack"
            )
        mu_r = self.reduced.mean()
        mu = self.original_total / self.reduced.count
        C = self.cross / self.reduced.count - torch.outer(mu, mu_r)
        return self.reduced.second_moment(centered=True), C


def collect_cross_statistics(
    original: nn.Module,
    reduced: nn.Module,
    consumer: str,
    data: Iterable[Any],
    *,
    max_samples: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    mask_fn: Callable[[Any], Tensor | None] | None = None,
    device: torch.device | str | None = None,
    transfer: Callable[[Any], Any] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    channels: int | None = None,
) -> CrossStatistics:
    """Run both networks on the same batches and stream ``G̃``, ``C`` and the sums at
    ``consumer``'s input.

    The batches reach the models as in
    :func:`~lightning_neuronprune.core.recording.collect_statistics` (the same loop,
    :func:`~lightning_neuronprune.core.recording.stream_inputs`): ``transfer``, then
    ``input_fn``, the model called through
    :func:`~lightning_neuronprune.core.batches.call_model` under ``forward_context``, and only
    the real tokens that ``mask_fn`` marks counted. Both models run in ``eval()`` under
    ``torch.no_grad()``; their modes are restored and the hooks removed afterwards, also on
    error. ``consumer`` must read the same n features in both (it is the
    junction about to be reduced, untouched so far in ``reduced``). A conv consumer's moments
    are over its input channels, every position a sample; so are an ``nn.Linear``'s when
    ``channels`` gives n for its flattened ``(n, *spatial)`` input (a conv junction).

    Args:
        original: the unreduced network (``X``).
        reduced: the network reduced so far (``X̃``).
        consumer: the qualified name of the ``nn.Linear`` (or conv) consumer, the same in both.
        data: batches, fed to both networks.
        max_samples, input_fn, mask_fn, device, transfer, forward_context: as in
            :func:`~lightning_neuronprune.core.recording.collect_statistics`.
        channels: n, the channels of an ``nn.Linear`` consumer's flattened input.

    Returns:
        The :class:`CrossStatistics`, all-reduced over the ranks of an initialised process group.

    Raises:
        StatisticsError: ``consumer`` differs between the networks or is not called alike in
            both, no sample reached it, or an activation is NaN or infinite.
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
    total = torch.zeros(n, dtype=torch.float64, device=device)
    captured: list[Tensor | None] = [None, None]
    padding: list[Tensor] = []  # zeroed padding rows of the reduced network's batches

    def capture(tap: int, rows: Tensor, shape: tuple[int, ...], pad: Tensor | None) -> None:
        captured[tap] = rows.to(device, torch.float64)
        if tap == 1 and pad is not None:
            padding.append(pad)

    def accumulate() -> None:
        X, Xr = captured
        if X is None or Xr is None or X.shape != Xr.shape:
            raise StatisticsError(
                f"{consumer!r} was not called alike in both networks (input rows "
                f"{None if X is None else tuple(X.shape)} and "
                f"{None if Xr is None else tuple(Xr.shape)})"
            )
        stats.update(Xr)
        cross.addmm_(X.T, Xr)
        total.add_(X.sum(0))
        captured[:] = [None, None]

    stream_inputs(
        [original, reduced], [(0, consumer), (1, consumer)], data, capture, end_batch=accumulate,
        max_samples=max_samples, input_fn=input_fn, mask_fn=mask_fn, device=device,
        transfer=transfer, forward_context=forward_context,
        channels={0: n, 1: n} if conv or channels is not None else None,
    )  # fmt: skip
    if padding:  # one read after the loop
        stats.count -= int(torch.stack(padding).sum())
    if stats.count == 0:
        raise StatisticsError(f"no sample reached {consumer!r}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        all_reduce(stats)
        torch.distributed.all_reduce(cross)
        torch.distributed.all_reduce(total)
    # Checked once, at the end: a NaN or Inf in any batch makes the float64 sums non-finite.
    if not (torch.isfinite(stats.total).all() and torch.isfinite(total).all()):
        raise StatisticsError(f"non-finite activations (NaN or Inf) at the input of {consumer!r}")
    return CrossStatistics(stats, cross, total)


def compensated_order(
    cs: CrossStatistics, weight: Tensor, *, steps: int | None = None, affine: bool = False
) -> Tensor:
    """Output-aware greedy order on the cross moments (see the module doc); ``(n,)`` LongTensor.

    The same recursion as :func:`~lightning_neuronprune.core.selection.output_order`, started from
    ``V = W C`` instead of ``W G``: ``R`` is the Schur complement of ``G̃``, and ``V = W C_res``
    follows it with the same rank-one updates. Sync-free, nested in p. With ``affine``, on the
    centred moments (:meth:`CrossStatistics.moments`).
    """
    G, C = cs.moments(centered=affine)
    n = G.shape[0]
    steps = n if steps is None else max(0, min(int(steps), n))
    if weight.dim() > 2 or weight.shape[1] != n:  # a conv junction: its taps stacked as rows
        weight = tap_matrix(weight, n)
    F = output_factor(weight, n, G)
    return greedy_output(G, F @ C, steps, n * torch.finfo(torch.float32).eps)


def compensate_junction(
    reduced: nn.Module,
    junction: Junction,
    cs: CrossStatistics,
    p: int,
    *,
    kept: Tensor | None = None,
    affine: bool = False,
) -> Tensor:
    """Reduce ``junction`` of ``reduced`` in place to p features with the compensating fit.

    ``W_p = W T`` with ``T = C[:, S] G̃[S, S]⁻¹`` (n × p); with ``affine`` on the centred moments,
    and ``b_p = b + W (μ - T μ̃_S)`` (a consumer without bias gets one).

    Args:
        reduced: the network being reduced (its consumer still reads all n features).
        junction: the junction.
        cs: cross statistics from :func:`collect_cross_statistics`.
        p: features to keep.
        kept: keep these instead of selecting with :func:`compensated_order`.
        affine: fit an intercept (needs ``cs.original_total``).

    Returns:
        The sorted kept indices (p,).
    """
    consumer = reduced.get_submodule(junction.consumer)
    n = cs.num_features
    if not 1 <= p <= n:
        raise ValueError(f"`p` must be in [1, {n}], got {p!r}")
    if kept is None:
        kept = compensated_order(cs, consumer.weight, steps=p, affine=affine)[:p]
    kept = torch.sort(kept.to(cs.cross.device, torch.long)).values
    G, C = cs.moments(centered=affine)
    T = solve_psd(G[kept][:, kept], C[:, kept])  # (n × p)
    c = None
    if affine:  # x ≈ T x̃_S + c in the mean: c = μ - T μ̃_S, (n,)
        c = cs.original_total / cs.reduced.count - T @ cs.reduced.mean()[kept]
    if junction.kind == "conv":  # every tap: W_p[:, s, t] = Σ_j W[:, j, t] T[j, s]
        W_p, b_p = reconstruct_channels(consumer.weight, consumer.bias, Reconstruction(T, c))
    else:
        W_p, b_p = reconstruct_consumer(consumer.weight, consumer.bias, Reconstruction(T, c))
    apply_reduction(reduced, junction, kept.to(consumer.weight.device), W_p, b_p)
    return kept
