"""The loss sensitivity of consumer outputs (diagonal Fisher) and the loss-weighted proxy."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics import MeanSquaredError
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from lightning_neuronprune import (
    CausalLMPerplexity,
    EnergyModel,
    FitOptions,
    JointSettings,
    ModelIO,
    ReductionSearch,
    SearchSettings,
    collect_statistics,
    find_junction,
)
from lightning_neuronprune.core.conv import ChannelFitter, tap_matrix
from lightning_neuronprune.core.fitting import JunctionFitter
from lightning_neuronprune.core.selection import nested_order
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search.allocation import allocation_path, proxy_curve
from lightning_neuronprune.search.metrics import causal_lm_nll
from lightning_neuronprune.search.sensitivity import default_loss, output_sensitivity


class TwoBranch(nn.Module):
    """Two identical junctions a1 → a2 and b1 → b2; branch b reaches the output scaled by
    ``scale``, so the loss cares less about it (its own output energy is the same)."""

    def __init__(self, scale: float = 0.05) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(6, 10), nn.Linear(10, 6)
        self.b1, self.b2 = nn.Linear(6, 10), nn.Linear(10, 6)
        self.b1.load_state_dict(self.a1.state_dict())
        self.b2.load_state_dict(self.a2.state_dict())
        self.head = nn.Linear(6, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a2(torch.tanh(self.a1(x)))
        b = self.b2(torch.tanh(self.b1(x)))
        return self.head(a + self.scale * b)


def _reference_fisher(model: TwoBranch, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Independent reference: the branch outputs as leaves of an explicit computation."""
    a = model.a2(torch.tanh(model.a1(x))).detach().requires_grad_()
    b = model.b2(torch.tanh(model.b1(x))).detach().requires_grad_()
    loss = nn.functional.cross_entropy(model.head(a + model.scale * b), y, reduction="sum")
    ga, gb = torch.autograd.grad(loss, [a, b])
    return {"a2": ga.double().pow(2).sum(0) / len(x), "b2": gb.double().pow(2).sum(0) / len(x)}


def test_output_sensitivity_matches_explicit_gradients_and_leaves_parameters_alone() -> None:
    torch.manual_seed(0)
    model = TwoBranch()
    model.head.weight.requires_grad_(False)  # a frozen parameter stays frozen
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    F = output_sensitivity(model, ["a2", "b2"], batches, default_loss())
    expected = _reference_fisher(model, x, y)
    for name in ("a2", "b2"):
        assert F[name].dtype == torch.float64 and F[name].shape == (6,)
        torch.testing.assert_close(F[name], expected[name], rtol=1e-5, atol=1e-12)
    # the scaled branch matters less, by scale² exactly (same outputs, gradient times scale)
    torch.testing.assert_close(F["b2"], F["a2"] * model.scale**2, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True] * 8 + [False, True]


def test_gradient_flows_through_a_later_consumer() -> None:
    """A consumer upstream of another sees the loss through it (the outputs are not cut)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    F = output_sensitivity(model, ["2", "4"], [(x, y)], default_loss())
    h = model[2](model[1](model[0](x))).detach().requires_grad_()
    loss = nn.functional.cross_entropy(model[4](model[3](h)), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, [h])
    torch.testing.assert_close(F["2"], g.double().pow(2).sum(0) / 20, rtol=1e-5, atol=1e-12)


def test_max_rows_stops_after_the_batch_that_reaches_it() -> None:
    torch.manual_seed(0)
    model = TwoBranch()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    seen: list[int] = []

    def batches():
        for i in range(0, 40, 10):
            seen.append(i)
            yield x[i : i + 10], y[i : i + 10]

    F = output_sensitivity(model, ["a2"], batches(), default_loss(), max_rows=15)
    assert seen == [0, 10]
    torch.testing.assert_close(F["a2"], _reference_fisher(model, x[:20], y[:20])["a2"])


def test_conv_consumer_sums_over_positions_per_channel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    )
    x, y = torch.randn(5, 2, 8, 8), torch.randint(0, 2, (5,))
    F = output_sensitivity(model, ["2"], [(x, y)], default_loss())
    h = model[2](model[1](model[0](x))).detach().requires_grad_()
    loss = nn.functional.cross_entropy(model[4](model[3](h)), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, [h])
    torch.testing.assert_close(F["2"], g.double().pow(2).sum((0, 2, 3)) / (5 * 4 * 4))


def test_default_loss_by_prediction_and_target() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 3] = -100
    lm = default_loss(CausalLMPerplexity())
    torch.testing.assert_close(lm(logits, labels), causal_lm_nll(logits, labels)[0])
    ce = default_loss(MulticlassAccuracy(7))
    scores, classes = torch.randn(4, 7), torch.tensor([0, 6, -100, 2])
    expected = nn.functional.cross_entropy(scores, classes, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ce(scores, classes), expected)
    # token classification (B, T, C) with (B, T) targets
    torch.testing.assert_close(
        ce(logits, labels.clamp_min(0)),
        nn.functional.cross_entropy(logits.reshape(-1, 7), labels.clamp_min(0).reshape(-1),
                                    reduction="sum"),
    )  # fmt: skip
    mse = default_loss(MeanSquaredError())
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(mse(a, b), 0.5 * ((a - b) ** 2).sum())
    with pytest.raises(NeuronEliminationError, match=r"shape \(3, 4\) and target \(3, 2\)"):
        mse(a, torch.randn(3, 2))


def test_loss_proxy_is_half_the_fisher_weighted_unexplained_energy() -> None:
    torch.manual_seed(0)
    X = torch.randn(300, 9, dtype=torch.float64) @ torch.randn(9, 9, dtype=torch.float64)
    st = JunctionStatistics.from_activations(X)
    W, F = torch.randn(4, 9, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    fitter = JunctionFitter(st, W, None, FitOptions(method="qr"))
    widths = [9, 7, 4, 1]
    curve = proxy_curve(fitter, widths, F)
    M = st.second_moment()
    order = nested_order(st)
    for p, value in zip(widths, curve, strict=True):
        S = order[:p]
        R = M - M[:, S] @ torch.linalg.pinv(M[S][:, S]) @ M[S, :]
        expected = 0.5 * float((F * torch.diagonal(W @ R @ W.T)).sum())
        assert value == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert curve[0] == 0.0 and curve == sorted(curve)


def test_loss_proxy_of_a_conv_consumer_weights_each_tap_by_its_channel() -> None:
    torch.manual_seed(0)
    X = torch.randn(500, 5, dtype=torch.float64)
    st = JunctionStatistics.from_activations(X)
    weight = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    F = torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64)
    scale = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)  # a following BatchNorm's γ/σ
    fitter = ChannelFitter(st, weight, None, FitOptions(method="qr"), output_scale=scale)
    W = tap_matrix(weight, 5)  # rows i·4 + t; the BatchNorm scale is not part of the loss proxy
    reference = JunctionFitter(st, W, None, FitOptions(method="qr"))
    assert proxy_curve(fitter, [5, 3, 1], F) == pytest.approx(
        proxy_curve(reference, [5, 3, 1], F.repeat_interleave(4))
    )


def test_allocation_by_the_loss_proxy_cuts_the_branch_the_loss_ignores() -> None:
    """Both junctions explain the same share of their own output energy; only the loss proxy
    sees that the network's output barely reads branch b."""
    torch.manual_seed(0)
    model = TwoBranch(scale=0.05)
    x = torch.randn(512, 6)
    y = model(x).argmax(1)
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    stats = collect_statistics(model, ["a2", "b2"], batches)
    F = output_sensitivity(model, ["a2", "b2"], batches, default_loss())
    fitters = {
        name: JunctionFitter(stats[name], model.get_submodule(name).weight, None,
                             FitOptions(method="qr"))
        for name in ("a2", "b2")
    }  # fmt: skip
    widths = {name: list(range(10, 0, -1)) for name in fitters}
    cost = dict.fromkeys(fitters, 1)
    energy = {k: proxy_curve(f, widths[k]) for k, f in fitters.items()}
    loss = {k: proxy_curve(f, widths[k], F[k]) for k, f in fitters.items()}
    assert energy["a2"] == pytest.approx(energy["b2"])
    path = allocation_path(widths, loss, cost)
    halfway = path[9]  # nine steps down
    assert halfway["b2"] < halfway["a2"] and halfway["b2"] <= 3


def _search(model: nn.Module, batches: list[Any], joint: JointSettings) -> ReductionSearch:
    junctions = [find_junction(model, name) for name in ("a1", "b1")]
    stats = collect_statistics(model, [j.consumer for j in junctions], batches)
    settings = SearchSettings(max_degradation=0.02, joint=joint, confirm=None)
    return ReductionSearch(model, junctions, stats, EnergyModel(), settings, ModelIO())


def test_pipeline_allocates_by_loss_and_falls_back_to_energy_with_a_warning() -> None:
    torch.manual_seed(0)
    model = TwoBranch(scale=0.05)
    x = torch.randn(512, 6)
    y = model(x).argmax(1)
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    search = _search(model, batches, JointSettings(strategy="allocate"))
    result = search.run(batches, MulticlassAccuracy(3), x[:1], train_data=batches)
    chosen = result.decision.plan
    assert chosen and chosen.get("b1", 10) < chosen.get("a1", 10)
    # binary probabilities (B,) against integer labels (B,): no default loss, so the energy
    # proxy, with a warning
    labels = (y == 0).long()
    binary = [(x[i : i + 128], labels[i : i + 128]) for i in range(0, 512, 128)]
    search = _search(model, binary, JointSettings(strategy="allocate"))
    warned: list[str] = []
    search.io = ModelIO(warn=warned.append, output_fn=lambda out: out[:, 0].sigmoid())
    search.run(binary, BinaryAccuracy(), x[:1], train_data=binary)
    assert any("'energy' proxy" in w and "shape (128,) and target (128,)" in w for w in warned)


def test_user_loss_errors_propagate() -> None:
    torch.manual_seed(0)
    model = TwoBranch()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    search = _search(model, [(x, y)], JointSettings(strategy="allocate"))

    def broken(preds: torch.Tensor, target: Any) -> torch.Tensor:
        raise NeuronEliminationError("my loss is broken")

    search.io = ModelIO(loss_fn=broken)
    with pytest.raises(NeuronEliminationError, match="my loss is broken"):
        search.run([(x, y)], MulticlassAccuracy(3), x[:1], train_data=[(x, y)])


def test_joint_settings_check_the_proxy_options() -> None:
    assert JointSettings(strategy="allocate").proxy == "loss"
    with pytest.raises(ValueError, match="`proxy` must be 'loss' or 'energy', got 'fisher'"):
        JointSettings(strategy="allocate", proxy="fisher")
    with pytest.raises(ValueError, match="`proxy_rows` must be a positive integer, got 0"):
        JointSettings(strategy="allocate", proxy_rows=0)


def test_training_batches_without_targets_fall_through_to_the_evaluation_data() -> None:
    """Statistics data that carries no target (unlabelled calibration text) cannot be scored;
    the loss proxy then reads the evaluation batches, with no warning."""
    torch.manual_seed(0)
    model = TwoBranch(scale=0.05)
    x = torch.randn(512, 6)
    y = model(x).argmax(1)
    unlabelled = [{"x": x[i : i + 128]} for i in range(0, 512, 128)]
    labelled = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    search = _search(model, labelled, JointSettings(strategy="allocate"))
    warned: list[str] = []
    search.io = ModelIO(
        warn=warned.append, input_fn=lambda b: b["x"] if isinstance(b, dict) else b[0]
    )
    result = search.run(labelled, MulticlassAccuracy(3), x[:1], train_data=unlabelled)
    assert not warned
    chosen = result.decision.plan
    assert chosen and chosen.get("b1", 10) < chosen.get("a1", 10)
