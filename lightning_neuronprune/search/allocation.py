"""Budgeted allocation of widths across many junctions: a local proxy, a path, a few evaluations.

Sweeping every p of every junction costs one full evaluation per grid point, thousands for the
30 FFNs of a language model. The ``"allocate"`` strategy spends evaluations only on a handful of
joint configurations:

1. **Proxy curves, no forward pass.** For junction j with consumer weight ``W`` (m × n) and input
   second moment ``M`` (n × n), keeping the features S and re-fitting the consumer by least
   squares (Eq. 6) explains ``E(S) = tr(W M[:, S] M[S, S]⁻¹ M[S, :] Wᵀ)`` of the consumer output
   energy ``E = tr(W M Wᵀ)`` (per sample). The proxy of width p is the unexplained share
   ``c_j(p) = 1 - E(S_p) / E``, where ``S_p`` is the kept set the fit will use
   (:meth:`~lightning_neuronprune.core.fitting.JunctionFitter.kept`). When the kept sets are
   nested (methods ``"qr"`` and ``"output"``), one Cholesky factor of ``M`` in kept order gives
   every p at once: with ``M[π, π] = L Lᵀ`` and ``C = L⁻¹ (W M[:, π])ᵀ``, ``E(π[:p])`` is the
   sum of the first p squared rows of ``C``.

   A share of each junction's own output energy says nothing of how much that output matters
   to the network: on a pretrained decoder it sends the cut to a few layers whose outputs the
   rest of the network barely tolerates losing. With the consumer output's diagonal Fisher
   ``F`` (:mod:`~lightning_neuronprune.search.sensitivity`), each output row k of ``W`` is
   weighted by ``F_kk``, and the proxy becomes the second-order loss increase
   ``c_j(p) = ½ (E_F - E_F(S_p))``, in the loss's units for every junction.
2. **A path.** Starting from the unreduced network, the junction whose next width costs the least
   proxy per weight saved (its best slope to any narrower width, so that a flat stretch after a
   steep step is seen) moves one width down, until every junction is at its narrowest. With
   ``uniform`` the path instead gives every junction the same fraction of its width (the same
   p where the widths agree).
3. **Bisection.** The drop grows along the path, so bisection finds the last configuration within
   the budget in about log₂(path length) evaluations, and never more than ``max_evaluations``.

Widths may be restricted to multiples of ``multiple`` (e.g. 64 or 128, which dense kernels run
faster on); the unreduced width is always allowed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_neuronprune.core.conv import ChannelFitter, tap_matrix
from lightning_neuronprune.core.fitting import JunctionFitter
from lightning_neuronprune.errors import NumericalWarning
from lightning_neuronprune.search.sweep import Ranks, rank_grid
from lightning_neuronprune.structure.junction import Junction

__all__ = [
    "allocation_path",
    "allowed_widths",
    "bisect_path",
    "proxy_curve",
    "uniform_path",
    "unexplained_energy",
    "unexplained_share",
    "weights_per_feature",
]


def allowed_widths(n: int, ranks: Ranks = "auto", multiple: int | None = None) -> list[int]:
    """The widths a junction of n features may take, largest (``n``) first.

    With ``multiple``: ``n`` and every multiple of it below ``n``; otherwise ``n`` and
    :func:`~lightning_neuronprune.search.sweep.rank_grid` of ``ranks``.
    """
    if multiple is not None:
        below = range(((n - 1) // multiple) * multiple, 0, -multiple)
        return [n, *below]
    return [n, *(p for p in rank_grid(n, ranks) if p < n)]


def _explained(W_M: Tensor, M: Tensor, order: Tensor) -> Tensor:
    """Cumulative explained output energy ``E(order[:k])`` for k = 1..len(order), (len(order),).

    ``W_M`` is ``W M`` (m × n). A small jitter keeps the Cholesky factor defined where features
    are linear combinations of earlier ones; they then add (almost) nothing. Where even a larger
    jitter fails (non-finite statistics), nothing counts as explained, with a warning.
    """
    A = M[order][:, order]
    scale = A.diagonal().abs().max().clamp_min(torch.finfo(M.dtype).tiny)
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    for relative in (1e-10, 1e-7, 1e-4):
        L, info = torch.linalg.cholesky_ex(A + relative * scale * eye)
        if int(info) == 0:
            C = torch.linalg.solve_triangular(L, W_M[:, order].T, upper=False)  # (len × m)
            return torch.cumsum((C**2).sum(1), 0)
    warnings.warn(
        f"the second moment of {A.shape[0]} kept features has no Cholesky factor; the allocation "
        "proxy counts nothing as explained for this junction",
        NumericalWarning,
        stacklevel=3,
    )
    return torch.zeros(order.numel(), dtype=M.dtype, device=M.device)


def unexplained_energy(
    moment: Tensor,
    weight: Tensor,
    kept_sets: Sequence[Tensor],
    row_weights: Tensor | None = None,
) -> tuple[list[float], float]:
    """``E - E(S)`` for each kept set S, and the total ``E`` (see the module docstring).

    With ``row_weights`` (m,), each output row k of ``W`` counts ``row_weights[k]`` times:
    ``E = tr(diag(r) W M Wᵀ)``, the loss-weighted energy of
    :mod:`~lightning_neuronprune.search.sensitivity` (without its factor ½).

    Args:
        moment: the second moment ``M`` of the consumer's input (n × n), float64.
        weight: the consumer's weight ``W`` (m × n).
        kept_sets: index tensors; nested sets (each within the next larger) share one factor.
        row_weights: non-negative weights of the m output rows, or ``None`` for ones.

    Returns:
        ``(unexplained, total)``: each unexplained energy in [0, total]; a non-finite total comes
        back as ``inf`` with every set unexplained (with a warning).
    """
    M = moment
    W = weight.detach().to(device=M.device, dtype=M.dtype)
    if row_weights is not None:
        W = W * row_weights.to(device=M.device, dtype=M.dtype).clamp_min(0).sqrt()[:, None]
    W_M = W @ M
    total = float((W_M * W).sum())
    if not math.isfinite(total):
        warnings.warn(
            "the consumer output energy tr(W M Wᵀ) is not finite; the allocation proxy counts "
            "every reduction of this junction as losing all of it",
            NumericalWarning,
            stacklevel=2,
        )
        return [math.inf] * len(kept_sets), math.inf
    if total <= 0 or not kept_sets:
        return [0.0] * len(kept_sets), max(total, 0.0)
    sets = [s.to(device=M.device, dtype=torch.long) for s in kept_sets]
    by_size = sorted(range(len(sets)), key=lambda i: sets[i].numel())
    nested = all(
        bool(torch.isin(sets[a], sets[b]).all()) for a, b in zip(by_size, by_size[1:], strict=False)
    )
    explained = [0.0] * len(sets)
    if nested:
        order: list[Tensor] = []
        seen = torch.zeros(M.shape[0], dtype=torch.bool, device=M.device)
        for i in by_size:
            new = sets[i][~seen[sets[i]]]
            seen[new] = True
            order.append(new)
        cumulative = _explained(W_M, M, torch.cat(order)).tolist()
        for i in by_size:
            k = sets[i].numel()
            explained[i] = cumulative[k - 1] if k else 0.0
    else:
        for i, S in enumerate(sets):
            explained[i] = float(_explained(W_M, M, S)[-1]) if S.numel() else 0.0
    return [min(total, max(0.0, total - e)) for e in explained], total


def unexplained_share(moment: Tensor, weight: Tensor, kept_sets: Sequence[Tensor]) -> list[float]:
    """``1 - E(S) / E`` for each kept set S (see the module docstring), each in [0, 1].

    Args:
        moment: the second moment ``M`` of the consumer's input (n × n), float64.
        weight: the consumer's weight ``W`` (m × n).
        kept_sets: index tensors; nested sets (each within the next larger) share one factor.
    """
    unexplained, total = unexplained_energy(moment, weight, kept_sets)
    if not math.isfinite(total):
        return [1.0] * len(kept_sets)
    if total <= 0:
        return [0.0] * len(kept_sets)
    return [min(1.0, max(0.0, u / total)) for u in unexplained]


def proxy_curve(
    fitter: JunctionFitter, widths: Sequence[int], sensitivity: Tensor | None = None
) -> list[float]:
    """The proxy ``c(p)`` of each width (0 at the unreduced width), with the kept sets of
    ``fitter``.

    Without ``sensitivity``: the unexplained share of the consumer output energy after the fit.
    With it (the consumer output's diagonal Fisher, (m,), from
    :func:`~lightning_neuronprune.search.sensitivity.output_sensitivity`): the second-order loss
    increase ``½ Σ_k F_kk (W R_S Wᵀ)_kk``, comparable across junctions. A conv consumer's rows are
    its taps (``m·P``), each weighted by its output channel's ``F``.
    """
    n = fitter.num_features
    reduced = [p for p in widths if p < n]
    fitter.prepare(reduced)
    kept = [fitter.kept(p) for p in reduced]
    if sensitivity is None:
        values = unexplained_share(fitter.moment, fitter.weight, kept)
    else:
        weight = fitter.weight
        if isinstance(fitter, ChannelFitter):  # unscaled by a following BatchNorm
            weight = tap_matrix(fitter.consumer_weight, n)
        rows = sensitivity.repeat_interleave(weight.shape[0] // sensitivity.numel())
        energy, _ = unexplained_energy(fitter.moment, weight, kept, rows)
        values = [0.5 * e for e in energy]
    by_p = dict(zip(reduced, values, strict=True))
    return [by_p.get(p, 0.0) for p in widths]


def weights_per_feature(model: torch.nn.Module, junction: Junction) -> int:
    """The weights one feature of ``junction`` carries: a consumer column plus a producer row."""
    n = junction.num_features
    count = model.get_submodule(junction.consumer).weight.numel() // n
    if junction.producer is not None:
        count += model.get_submodule(junction.producer).weight.numel() // n
    return max(1, count)


def allocation_path(
    widths: Mapping[str, Sequence[int]],
    curves: Mapping[str, Sequence[float]],
    cost: Mapping[str, float],
) -> list[dict[str, int]]:
    """Configurations from unreduced (every layer at ``widths[layer][0]``) to every layer at its
    narrowest, one layer one width down per step.

    The layer that moves is the one with the smallest proxy increase per unit of ``cost`` saved
    (``cost[layer]`` per feature, e.g. weights), measured to the best of its narrower widths;
    ties go to the larger saving.
    """
    position = {layer: 0 for layer in widths}
    config = {layer: int(ws[0]) for layer, ws in widths.items()}
    path = [dict(config)]

    def slope(layer: str) -> tuple[float, float]:
        ws, cs, i = widths[layer], curves[layer], position[layer]
        best = (math.inf, 0.0)
        for k in range(i + 1, len(ws)):
            saved = (ws[i] - ws[k]) * cost[layer]
            best = min(best, (max(0.0, cs[k] - cs[i]) / saved, -saved))
        return best

    slopes = {layer: slope(layer) for layer in widths if len(widths[layer]) > 1}
    while slopes:
        layer = min(slopes, key=lambda name: slopes[name])
        position[layer] += 1
        config[layer] = int(widths[layer][position[layer]])
        path.append(dict(config))
        if position[layer] + 1 < len(widths[layer]):
            slopes[layer] = slope(layer)
        else:
            del slopes[layer]
    return path


def uniform_path(widths: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """Configurations where every layer keeps the same fraction of its width (rounded up to an
    allowed width), from unreduced down; layers of one width get the same p."""
    full = {layer: ws[0] for layer, ws in widths.items()}
    fractions = sorted({p / full[layer] for layer, ws in widths.items() for p in ws}, reverse=True)
    path: list[dict[str, int]] = []
    for f in fractions:
        config = {}
        for layer, ws in widths.items():
            fits = [p for p in ws if p >= f * full[layer] - 1e-9]
            config[layer] = int(min(fits))
        if not path or config != path[-1]:
            path.append(config)
    return path


def bisect_path(length: int, within: Callable[[int], bool], max_evaluations: int) -> int:
    """The largest index i < ``length`` with ``within(i)`` true, by bisection, assuming index 0
    holds and the property holds up to some index and not after. ``within`` is called at most
    ``max_evaluations`` times (never at 0); returns 0 when no other index was found to hold."""
    lo, hi, calls = 0, length, 0
    while hi - lo > 1 and calls < max_evaluations:
        mid = (lo + hi) // 2
        calls += 1
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo
