"""Channel statistics and the per-tap refit of conv junctions (core/conv.py, core/statistics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_neuronprune.core.conv import (
    ChannelFitter,
    fit_channels,
    reconstruct_channels,
    tap_matrix,
)
from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.reconstruction import Reconstruction
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.errors import StatisticsError

DTYPES = [torch.float32, torch.float64]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def _numpy_refit(W: np.ndarray, b: np.ndarray, T: np.ndarray, c: np.ndarray | None):
    """The independent reference: a loop over kernel taps, ``W_p[:, :, t] = W[:, :, t] @ T``."""
    m, n = W.shape[:2]
    kernel = W.shape[2:]
    Wt = W.reshape(m, n, -1)
    W_p = np.zeros((m, T.shape[1], Wt.shape[2]))
    b_p = b.copy()
    for t in range(Wt.shape[2]):
        W_p[:, :, t] = Wt[:, :, t] @ T
        if c is not None:
            b_p = b_p + Wt[:, :, t] @ c
    return W_p.reshape(m, T.shape[1], *kernel), b_p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [(3, 3), (2, 5), (3,)])
def test_per_tap_refit_matches_numpy(generator: torch.Generator, dtype, kernel) -> None:
    m, n, p = 4, 6, 3
    W = torch.randn(m, n, *kernel, generator=generator, dtype=dtype)
    b = torch.randn(m, generator=generator, dtype=dtype)
    T = torch.randn(n, p, generator=generator, dtype=torch.float64)
    c = torch.randn(n, generator=generator, dtype=torch.float64)
    for rec_c in (None, c):
        W_p, b_p = reconstruct_channels(W, b, Reconstruction(T, rec_c))
        ref_W, ref_b = _numpy_refit(
            W.double().numpy(), b.double().numpy(), T.numpy(),
            None if rec_c is None else rec_c.numpy(),
        )  # fmt: skip
        assert W_p.shape == (m, p, *kernel) and W_p.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(W_p.double().numpy(), ref_W, rtol=tol, atol=tol)
        np.testing.assert_allclose(b_p.double().numpy(), ref_b, rtol=tol, atol=tol)


def test_flattened_linear_refit_matches_numpy(generator: torch.Generator) -> None:
    m, n, P, p = 5, 4, 6, 2  # a Linear over flatten((n, 2, 3))
    W = torch.randn(m, n * P, generator=generator, dtype=torch.float64)
    T = torch.randn(n, p, generator=generator, dtype=torch.float64)
    W_p, b_p = reconstruct_channels(W, None, Reconstruction(T, None))
    ref, _ = _numpy_refit(W.numpy().reshape(m, n, P), np.zeros(m), T.numpy(), None)
    assert W_p.shape == (m, p * P) and b_p is None
    np.testing.assert_allclose(W_p.numpy(), ref.reshape(m, p * P), rtol=1e-12, atol=1e-12)


def test_tap_matrix_rows_are_taps() -> None:
    W = torch.arange(2 * 3 * 4.0).reshape(2, 3, 2, 2)
    Wt = tap_matrix(W, 3)
    assert Wt.shape == (8, 3)
    torch.testing.assert_close(Wt[1 * 4 + 2], W[1, :, 1, 0])


@pytest.mark.parametrize("conv", ["1d", "2d", "2d_channels_last"])
def test_channel_statistics_sum_over_positions(generator: torch.Generator, conv: str) -> None:
    if conv == "1d":
        model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.Conv1d(5, 3, 3))
        xs = [torch.randn(4, 2, 9, generator=generator) for _ in range(2)]
    else:
        model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Conv2d(5, 3, 3))
        xs = [torch.randn(4, 2, 7, 6, generator=generator) for _ in range(2)]
        if conv == "2d_channels_last":
            model = model.to(memory_format=torch.channels_last)
            xs = [x.to(memory_format=torch.channels_last) for x in xs]
    stats = collect_statistics(model, ["2"], xs)["2"]
    H = torch.relu(model[0](torch.cat(xs))).double()  # (B, 5, *spatial)
    rows = H.transpose(0, 1).reshape(5, -1)  # channels × (samples·positions)
    torch.testing.assert_close(stats.gram, rows @ rows.T)
    torch.testing.assert_close(stats.total, rows.sum(1))
    assert stats.count == rows.shape[1]


def test_flattened_statistics_with_channels(generator: torch.Generator) -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 2))
    x = torch.randn(5, 1, 6, 6, generator=generator)
    stats = collect_statistics(model, ["2"], [x], channels={"2": 3})["2"]
    H = model[0](x).double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(stats.gram, H @ H.T)
    assert stats.count == 5 * 16
    with pytest.raises(StatisticsError, match="`channels` gives '2' 5 channels"):
        collect_statistics(model, ["2"], [x], channels={"2": 5})
    with pytest.raises(StatisticsError, match="`channels` gives '0'"):
        collect_statistics(model, ["0"], [x], channels={"0": 1})


def _duplicated_pair(mode: str, dtype, generator: torch.Generator, padding: int = 1):
    """conv1 (3 → 8, channels 5..7 copy or double 0..2) → ReLU → conv2 (8 → 4)."""
    conv1 = nn.Conv2d(3, 8, 3, padding=1, dtype=dtype)
    conv2 = nn.Conv2d(8, 4, 3, padding=padding, padding_mode=mode, dtype=dtype)
    with torch.no_grad():
        conv1.weight[5:] = (
            conv1.weight[:3] * torch.tensor([1.0, 2.0, 0.5], dtype=dtype)[:, None, None, None]
        )
        conv1.bias[5:] = conv1.bias[:3] * torch.tensor([1.0, 2.0, 0.5], dtype=dtype)
    x = torch.randn(6, 3, 7, 7, generator=generator, dtype=dtype)
    h = torch.relu(conv1(x))
    return conv2, h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("method", ["svd_qr", "qr", "output"])
def test_dependent_channels_are_removed_losslessly(
    generator: torch.Generator, dtype, mode: str, method: str
) -> None:
    conv2, h = _duplicated_pair(mode, dtype, generator)
    model = nn.Sequential(conv2)
    stats = collect_statistics(model, ["0"], [h.detach()])["0"]
    fit = fit_channels(
        stats, conv2.weight, conv2.bias, 5, FitOptions(method=method),
        zero_padding=mode == "zeros",
    )  # fmt: skip
    assert fit.weight.shape == (4, 5, 3, 3) and fit.weight.dtype == dtype
    reduced = nn.Conv2d(5, 4, 3, padding=1, padding_mode=mode, dtype=dtype)
    with torch.no_grad():
        reduced.weight.copy_(fit.weight)
        reduced.bias.copy_(fit.bias)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(reduced(h[:, fit.kept]), conv2(h), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "valid"])
def test_affine_fit_where_padding_copies_real_positions(generator: torch.Generator, mode) -> None:
    conv2, h = _duplicated_pair(
        "zeros" if mode == "valid" else mode, torch.float64, generator,
        padding=0 if mode == "valid" else 1,
    )  # fmt: skip
    stats = collect_statistics(nn.Sequential(conv2), ["0"], [h.detach()])["0"]
    fitter = ChannelFitter(stats, conv2.weight, conv2.bias, FitOptions(affine=True))
    fit = fitter.fit(5)
    reduced = nn.Conv2d(5, 4, 3, padding=conv2.padding, padding_mode=conv2.padding_mode)
    reduced = reduced.double()
    with torch.no_grad():
        reduced.weight.copy_(fit.weight)
        reduced.bias.copy_(fit.bias)
        torch.testing.assert_close(reduced(h[:, fit.kept]), conv2(h), rtol=1e-9, atol=1e-9)


def test_affine_refused_with_zero_padding(generator: torch.Generator) -> None:
    conv2, h = _duplicated_pair("zeros", torch.float32, generator)
    stats = collect_statistics(nn.Sequential(conv2), ["0"], [h.detach()])["0"]
    with pytest.raises(ValueError, match="`affine` cannot be used where the consumer pads"):
        ChannelFitter(stats, conv2.weight, conv2.bias, FitOptions(affine=True), zero_padding=True)


def test_weight_must_read_the_channels(generator: torch.Generator) -> None:
    conv2, h = _duplicated_pair("zeros", torch.float32, generator)
    stats = collect_statistics(nn.Sequential(conv2), ["0"], [h.detach()])["0"]
    with pytest.raises(ValueError, match=r"shape \(4, 7\) does not read n=8 channels"):
        ChannelFitter(stats, torch.zeros(4, 7), None)


def test_output_scale_weighs_selection_only(generator: torch.Generator) -> None:
    conv2, h = _duplicated_pair("zeros", torch.float64, generator)
    stats = collect_statistics(nn.Sequential(conv2), ["0"], [h.detach()])["0"]
    scale = torch.rand(4, generator=generator, dtype=torch.float64) * 10
    options = FitOptions(method="output")
    scaled = ChannelFitter(stats, conv2.weight, conv2.bias, options, output_scale=scale)
    by_hand = ChannelFitter(stats, conv2.weight * scale[:, None, None, None], None, options)
    for p in (2, 3):
        assert torch.equal(scaled.kept(p), by_hand.kept(p))
        plain = ChannelFitter(stats, conv2.weight, conv2.bias, options).refit(scaled.kept(p))
        torch.testing.assert_close(scaled.fit(p).weight, plain.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`output_scale` must have shape \(4,\)"):
        ChannelFitter(stats, conv2.weight, None, options, output_scale=torch.ones(3))
