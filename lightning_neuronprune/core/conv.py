"""The fit of a channel junction: n channels read at several positions by one consumer.

A convolution is linear in its input channels. With the consumer's weight seen per tap,
``W`` of shape (m, n, P) (a conv's P = k_h·k_w kernel taps; a ``Linear`` that reads a flattened
``(n, *spatial)`` map has one "tap" per position, P = H·W), its output is
``y = Σ_taps W[:, :, t] x_t``. Every spatial position is a sample of the n channels, so the
statistics are ``G = Σ_positions x xᵀ`` (n × n, :func:`~.recording.channel_rows`) and the
least-squares map is the one of Eq. 6, ``x ≈ T x_S`` with ``T = G[:, S] G[S, S]⁻¹`` (n × p).
It holds at every position, so every tap is re-fitted by it::

    W_p[:, s, t] = Σ_j W[:, j, t] T[j, s]          (m, p, P)

With the affine fit, ``x ≈ T x_S + c``, the intercept folds into the bias,
``b_p = b + Σ_t W[:, :, t] c``. That is exact only where every position the consumer reads is a
real one or a copy of one: a consumer that pads with zeros reads ``0``, not ``c``, at its
borders, so it gets no intercept (:class:`ChannelFitter` refuses ``affine`` there).

Selection treats the tap-stacked weight ``W̃`` (m·P × n, :func:`tap_matrix`) as the consumer's
weight, so ``method="output"`` maximises ``Σ_t ‖W[:, :, t] X‖²`` explained.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_neuronprune.core.fitting import Fit, FitOptions, JunctionFitter
from lightning_neuronprune.core.reconstruction import Reconstruction
from lightning_neuronprune.core.statistics import JunctionStatistics

__all__ = ["ChannelFitter", "fit_channels", "reconstruct_channels", "tap_matrix", "taps"]


def taps(weight: Tensor, n: int) -> Tensor:
    """The consumer's weight per tap, (m, n, P): a conv's (m, n, *kernel) or a ``Linear``'s
    (m, n·P) over a flattened (n, *spatial) input.

    Raises:
        ValueError: the weight does not read n channels.
    """
    m = weight.shape[0]
    if weight.dim() < 2 or (weight.shape[1] != n if weight.dim() > 2 else weight.shape[1] % n != 0):
        raise ValueError(
            f"the consumer's weight of shape {tuple(weight.shape)} does not read n={n} channels: "
            "expected (m, n, *kernel) or (m, n·P)"
        )
    return weight.reshape(m, n, -1)


def tap_matrix(weight: Tensor, n: int) -> Tensor:
    """``W̃``, the taps stacked as rows: (m·P × n) with ``W̃[i·P + t, j] = W[i, j, t]``; the
    consumer's weight as far as selection is concerned."""
    W = taps(weight.detach(), n)
    return W.transpose(1, 2).reshape(-1, n)


def reconstruct_channels(
    weight: Tensor, bias: Tensor | None, rec: Reconstruction
) -> tuple[Tensor, Tensor | None]:
    """The consumer's new parameters, per tap: ``W_p[:, s, t] = Σ_j W[:, j, t] T[j, s]`` and
    ``b_p = b + Σ_t W[:, :, t] c``.

    Args:
        weight: ``W``, (m, n, *kernel) for a conv or (m, n·P) for a ``Linear`` over a flattened
            (n, *spatial) map.
        bias: b, (m,) or ``None``.
        rec: the reconstruction of the n channels from the p kept ones (``T``: n × p).

    Returns:
        ``(W_p, b_p)`` in the layout, dtype and device of ``weight``: (m, p, *kernel) or
        (m, p·P); ``b_p`` is ``None`` only when ``bias`` is ``None`` and the fit has no intercept.
    """
    n, p = rec.T.shape
    W = taps(weight.detach(), n).to(rec.T.device, torch.float64)  # (m, n, P)
    W_p = torch.einsum("mjt,js->mst", W, rec.T)  # (m, p, P)
    shape = (weight.shape[0], p, *weight.shape[2:]) if weight.dim() > 2 else (weight.shape[0], -1)
    b_p: Tensor | None = None
    if bias is not None or rec.c is not None:
        b = bias.detach().to(W) if bias is not None else W.new_zeros(W.shape[0])
        if rec.c is not None:
            b = b + torch.einsum("mjt,j->m", W, rec.c)
        b_p = b.to(weight.device, weight.dtype)
    return W_p.reshape(shape).to(weight.device, weight.dtype), b_p


class ChannelFitter(JunctionFitter):
    """:class:`~.fitting.JunctionFitter` for a channel junction: select p of n channels, then
    re-fit every tap of the consumer (:func:`reconstruct_channels`).

    Args:
        stats: channel statistics of the consumer's input (every position a sample).
        weight: the consumer's weight, (m, n, *kernel) or (m, n·P).
        bias: its bias, (m,), or ``None``.
        options: the :class:`~.fitting.FitOptions`.
        zero_padding: the consumer pads its input with zeros; then no intercept can be fitted.
        output_scale: (m,) factors applied to the consumer's output channels after it (a
            following BatchNorm's ``γ / σ``); ``method="output"`` then explains the scaled
            output ``diag(output_scale) W X``. The refit does not depend on it.

    Raises:
        ValueError: ``affine`` with ``zero_padding``, or a weight that does not read n channels.
    """

    def __init__(
        self,
        stats: JunctionStatistics,
        weight: Tensor,
        bias: Tensor | None,
        options: FitOptions | None = None,
        *,
        zero_padding: bool = False,
        output_scale: Tensor | None = None,
    ) -> None:
        options = options or FitOptions()
        if options.affine and zero_padding:
            raise ValueError(
                "`affine` cannot be used where the consumer pads with zeros: its borders read 0, "
                "not the intercept; use `affine=False` (or a consumer with padding_mode "
                "'reflect', 'replicate' or 'circular', or no padding)"
            )
        selected = weight.detach()
        if output_scale is not None:
            if output_scale.shape != (weight.shape[0],):
                raise ValueError(
                    f"`output_scale` must have shape ({weight.shape[0]},), one factor per output "
                    f"channel, got {tuple(output_scale.shape)}"
                )
            scale = output_scale.detach().to(selected)
            selected = selected * scale.reshape(-1, *[1] * (selected.dim() - 1))
        super().__init__(stats, tap_matrix(selected, stats.num_features), None, options)
        self.consumer_weight = weight
        self.consumer_bias = bias

    def fit(self, p: int, *, check: bool = True) -> Fit:
        """The kept channels and the consumer's new parameters at p (see
        :meth:`~.fitting.JunctionFitter.fit`); ``weight`` has the consumer's layout."""
        return self.refit(self.kept(p), check=check)

    def refit(self, kept: Tensor, *, check: bool = True) -> Fit:
        """The consumer's new parameters for given kept channels (sorted (p,) indices)."""
        rec, ok = self.transform(kept, check=check)
        W_p, b_p = reconstruct_channels(self.consumer_weight, self.consumer_bias, rec)
        return Fit(kept, W_p, b_p, ok)


def fit_channels(
    stats: JunctionStatistics,
    weight: Tensor,
    bias: Tensor | None,
    p: int,
    options: FitOptions | None = None,
    *,
    zero_padding: bool = False,
) -> Fit:
    """Select p channels and re-fit every tap of the consumer: the one fit step of a channel
    junction (see :class:`ChannelFitter`)."""
    return ChannelFitter(stats, weight, bias, options, zero_padding=zero_padding).fit(p)
