"""Tests of :mod:`lightning_neuronprune.cost.energy` against the paper's "Original" energy rows."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_neuronprune.cost.counting import LayerCount, count_linear, count_nothing
from lightning_neuronprune.cost.energy import EnergyModel, EnergyReport
from lightning_neuronprune.errors import NeuronEliminationError, UnsupportedLayerError
from lightning_neuronprune.testing.models import LeNet5, LeNet300100, caffenet

MICRO, NANO, MILLI = 1e6, 1e9, 1e3


@pytest.fixture(scope="module")
def caffenet_report() -> EnergyReport:
    return EnergyModel().estimate(caffenet(), torch.zeros(1, 3, 227, 227))


@pytest.fixture
def mnist_batch(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(3, 1, 28, 28, generator=generator)


def _printed(value: float, scale: float, digits: int) -> float:
    return round(value * scale, digits)


def _assert_total_within_rounding(
    report: EnergyReport, printed_total: float, scale: float, digits: int, parts: int
) -> None:
    """The paper's total is a sum of rounded parts: allow half a printed unit per part."""
    tolerance = parts * 0.5 * 10.0**-digits + 1e-9
    assert abs(report.total * scale - printed_total) <= tolerance


# --------------------------------------------------------------------------------------------------
# Reference rows of DESIGN.md section 2
# --------------------------------------------------------------------------------------------------


def test_lenet5_original_row(mnist_batch: torch.Tensor) -> None:
    report = EnergyModel().estimate(LeNet5(), mnist_batch)
    assert report.macs == 24 * 24 * 20 * 25 + 8 * 8 * 50 * 25 * 20 + 800 * 500 + 500 * 10
    assert report.weights == 500 + 25_000 + 400_000 + 5_000
    assert report.activations == 784 + 20 * 12 * 12 + 800 + 500 + 10
    assert _printed(report.mac, MICRO, 2) == 10.55
    assert _printed(report.sram_weights, MICRO, 2) == 2.15
    assert _printed(report.sram_activations, NANO, 2) == 49.74
    assert _printed(report.dram, MICRO, 2) == 275.52
    assert _printed(report.total, MICRO, 2) == 288.27
    # MAC, SRAM_weights and DRAM in µJ (2 digits), SRAM_activations in nJ (negligible rounding).
    _assert_total_within_rounding(report, 288.27, MICRO, 2, parts=3)


def test_caffenet_original_row(caffenet_report: EnergyReport) -> None:
    report = caffenet_report
    assert _printed(report.mac, MILLI, 2) == 3.33
    assert _printed(report.sram_weights, MILLI, 2) == 0.30
    assert _printed(report.sram_activations, MICRO, 2) == 4.16
    assert _printed(report.dram, MILLI, 2) == 39.01
    # The paper prints 42.64 mJ, the sum of its rounded parts; the exact total is 42.652 mJ.
    assert _printed(report.total, MILLI, 3) == 42.652
    _assert_total_within_rounding(report, 42.64, MILLI, 2, parts=3)


def test_caffenet_counts(caffenet_report: EnergyReport) -> None:
    per_layer = caffenet_report.per_layer
    assert list(per_layer) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    # H_out · W_out · C_out · k_h · k_w · C_in / groups
    assert per_layer["conv1"].macs == 55 * 55 * 96 * 11 * 11 * 3
    assert per_layer["conv2"].macs == 27 * 27 * 256 * 5 * 5 * 96 // 2
    assert per_layer["conv3"].macs == 13 * 13 * 384 * 3 * 3 * 256
    assert per_layer["conv4"].macs == 13 * 13 * 384 * 3 * 3 * 384 // 2
    assert per_layer["conv5"].macs == 13 * 13 * 256 * 3 * 3 * 384 // 2
    assert per_layer["conv2"].weights == 256 * 48 * 5 * 5
    assert per_layer["conv2"].activations == 96 * 27 * 27  # input before padding
    assert per_layer["fc6"] == LayerCount(macs=9216 * 4096, weights=9216 * 4096, activations=9216)
    assert caffenet_report.output_activations == 1000
    assert caffenet_report.macs == 724_406_816
    assert caffenet_report.weights == 60_954_656
    assert caffenet_report.activations == 416_035


def test_lenet300100_original_row(mnist_batch: torch.Tensor) -> None:
    report = EnergyModel().estimate(LeNet300100(), mnist_batch)
    assert report.macs == report.weights == 784 * 300 + 300 * 100 + 100 * 10
    assert report.activations == 784 + 300 + 100 + 10
    assert _printed(report.mac, MICRO, 2) == 1.22
    assert _printed(report.sram_weights, MICRO, 2) == 1.33
    assert _printed(report.sram_activations, NANO, 2) == 11.94
    # The paper prints 170.51 µJ; the rules (and every other row of the paper) give 170.37 µJ.
    assert _printed(report.dram, MICRO, 2) == 170.37


def test_meta_device_gives_the_same_counts(caffenet_report: EnergyReport) -> None:
    meta = EnergyModel().estimate(
        caffenet(device="meta"), torch.zeros(2, 3, 227, 227, device="meta")
    )
    assert meta == caffenet_report
    assert meta.per_layer == caffenet_report.per_layer


# --------------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------------


def test_energy_formulas_and_memory_bits(mnist_batch: torch.Tensor) -> None:
    energy = EnergyModel()
    report = energy.estimate(LeNet5(), mnist_batch)
    assert report.mac == pytest.approx(report.macs * 4.6e-12)
    assert report.sram_weights == pytest.approx(report.weights * 5e-12)
    assert report.sram_activations == pytest.approx(report.activations * 10e-12)
    assert report.dram == pytest.approx(report.weights * 640e-12)
    assert report.total == pytest.approx(
        report.mac + report.sram_weights + report.sram_activations + report.dram
    )
    assert report.params_bits == 430_500 * 32
    assert report.total_bits == (430_500 + 4_974) * 32
    assert report.activations == sum(c.activations for c in report.per_layer.values()) + 10


def test_overriding_constants_scales_results(mnist_batch: torch.Tensor) -> None:
    model = LeNet300100()
    base = EnergyModel().estimate(model, mnist_batch)
    doubled = EnergyModel(mac=9.2e-12, sram_access=10e-12, dram_access=1280e-12, bits_per_word=64)
    report = doubled.estimate(model, mnist_batch)
    for key in ("mac", "sram_weights", "sram_activations", "dram", "total"):
        assert getattr(report, key) == pytest.approx(2 * getattr(base, key))
    assert report.params_bits == 2 * base.params_bits
    assert report.total_bits == 2 * base.total_bits
    assert (report.macs, report.weights, report.activations) == (
        base.macs,
        base.weights,
        base.activations,
    )

    mac_only = EnergyModel(mac=1.0, sram_access=0.0, dram_access=0.0).estimate(model, mnist_batch)
    assert mac_only.total == mac_only.macs


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_groups_are_counted(groups: int) -> None:
    conv = nn.Conv2d(8, 12, kernel_size=3, padding=1, groups=groups, bias=False)
    report = EnergyModel().estimate(conv, torch.zeros(1, 8, 5, 7))
    assert report.macs == 5 * 7 * 12 * 3 * 3 * 8 // groups
    assert report.weights == 12 * 3 * 3 * 8 // groups
    assert report.activations == 8 * 5 * 7 + 12 * 5 * 7


def test_conv1d_and_strides() -> None:
    conv = nn.Conv1d(4, 6, kernel_size=3, stride=2)
    report = EnergyModel().estimate(conv, torch.zeros(2, 4, 11))
    assert report.macs == 5 * 6 * 3 * 4
    assert report.weights == 6 * 4 * 3


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_per_inference_is_independent_of_batch_size(batch: int) -> None:
    model = LeNet5()
    one = EnergyModel().estimate(model, torch.zeros(1, 1, 28, 28))
    many = EnergyModel().estimate(model, torch.zeros(batch, 1, 28, 28))
    assert many == one
    assert many.per_layer == one.per_layer


def test_linear_with_extra_leading_dims_counts_every_row() -> None:
    report = EnergyModel().estimate(nn.Linear(6, 5), torch.zeros(3, 4, 6))
    assert report.per_layer[""] == LayerCount(macs=4 * 6 * 5, weights=30, activations=4 * 6)
    assert report.output_activations == 4 * 5


def test_explicit_batch_size_for_unbatched_input() -> None:
    report = EnergyModel().estimate(nn.Linear(6, 5), torch.zeros(6), batch_size=1)
    assert report.macs == 30

    with pytest.raises(NeuronEliminationError, match="not a whole number"):
        EnergyModel().estimate(nn.Linear(6, 5), torch.zeros(3, 6), batch_size=2)
    with pytest.raises(ValueError, match="`batch_size`"):
        EnergyModel().estimate(nn.Linear(6, 5), torch.zeros(3, 6), batch_size=0)
    with pytest.raises(ValueError, match="`batch_size`"):
        EnergyModel().estimate(nn.Linear(1, 5), torch.tensor(1.0))


def test_gathering_linear_subclass_counts_gathered_features() -> None:
    """A Linear subclass reading p of n input features (like surgery.GatheredLinear)."""

    class Gathered(nn.Linear):
        def __init__(self, index: torch.Tensor, out_features: int) -> None:
            super().__init__(index.numel(), out_features)
            self.register_buffer("index", index)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x.index_select(-1, self.index), self.weight, self.bias)

    # LeNet-5 "FC1" keeping 9 of the 800 flattened conv features: memory 8.13%, 12.30x (paper).
    reduced = LeNet5()
    reduced.fc1 = Gathered(torch.arange(9) * 7, 500)
    x = torch.zeros(2, 1, 28, 28)
    report = EnergyModel().estimate(reduced, x)
    assert report.per_layer["fc1"] == LayerCount(macs=9 * 500, weights=9 * 500, activations=9)
    original = EnergyModel().estimate(LeNet5(), x)
    assert round(original.memory_ratio(report), 2) == 12.30
    assert round(100 / original.memory_ratio(report), 2) == 8.13


def test_tuple_input_and_tuple_output() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(y)

    report = EnergyModel().estimate(TwoHeads(), (torch.zeros(2, 3), torch.zeros(2, 4)))
    assert report.macs == 6 + 20
    assert report.activations == 3 + 4 + 2 + 5
    assert report.output_activations == 7


def test_shared_module_counts_weights_once() -> None:
    fc = nn.Linear(4, 4)
    model = nn.Sequential(OrderedDict([("a", fc), ("relu", nn.ReLU()), ("b", fc)]))
    report = EnergyModel().estimate(model, torch.zeros(2, 4))
    assert list(report.per_layer) == ["a"]
    assert report.per_layer["a"] == LayerCount(macs=32, weights=16, activations=8)


def test_free_layers_cost_nothing() -> None:
    class Gather(nn.Module):
        _neuronprune_cost_free = True

        def __init__(self) -> None:
            super().__init__()
            self.index = nn.Parameter(torch.tensor([0, 2]), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, self.index]

    model = nn.Sequential(
        OrderedDict(
            [
                ("gather", Gather()),
                ("fc", nn.Linear(2, 3)),
                ("bn", nn.BatchNorm1d(3)),
                ("act", nn.ReLU()),
                ("drop", nn.Dropout()),
            ]
        )
    )
    report = EnergyModel().estimate(model, torch.zeros(2, 4))
    assert list(report.per_layer) == ["fc"]
    assert report.macs == report.weights == 6
    assert report.activations == 2 + 3

    charged = EnergyModel().with_rule(
        nn.BatchNorm1d, lambda m, x, y: LayerCount(weights=m.weight.numel())
    )
    assert charged.estimate(model, torch.zeros(2, 4)).per_layer["bn"] == LayerCount(weights=3)


# --------------------------------------------------------------------------------------------------
# Unsupported layers and rules
# --------------------------------------------------------------------------------------------------


class _Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def _scale_rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerCount:
    return LayerCount(macs=x.numel(), weights=module.gain.numel(), activations=x.numel())


def test_unknown_parametrised_layer_raises() -> None:
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 4)), ("scale", _Scale(4))]))
    with pytest.raises(UnsupportedLayerError, match=r"'scale' \(_Scale\)"):
        EnergyModel().estimate(model, torch.zeros(2, 4))

    prelu = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 4)), ("act", nn.PReLU())]))
    with pytest.raises(UnsupportedLayerError, match=r"'act' \(PReLU\)"):
        EnergyModel().estimate(prelu, torch.zeros(2, 4))


def test_container_with_own_parameters_raises() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.offset = nn.Parameter(torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.offset

    model = nn.Sequential(OrderedDict([("block", Block())]))
    with pytest.raises(UnsupportedLayerError, match=r"'block' \(Block\)"):
        EnergyModel().estimate(model, torch.zeros(2, 4))


def test_unreached_unsupported_layer_is_ignored() -> None:
    class WithUnusedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.unused = _Scale(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    report = EnergyModel().estimate(WithUnusedHead(), torch.zeros(2, 4))
    assert list(report.per_layer) == ["fc"]


def test_registered_rule_counts_the_layer() -> None:
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 4)), ("scale", _Scale(4))]))
    base = EnergyModel()
    energy = base.with_rule(_Scale, _scale_rule)
    assert base.rules == {}  # with_rule returns a new model
    report = energy.estimate(model, torch.zeros(2, 4))
    assert report.per_layer["scale"] == LayerCount(macs=4, weights=4, activations=4)
    assert report.macs == 16 + 4

    via_field = EnergyModel(rules={_Scale: _scale_rule}).estimate(model, torch.zeros(2, 4))
    assert via_field == report


def test_rules_apply_to_subclasses_and_override_builtins() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(OrderedDict([("fc", MyLinear(4, 3))]))
    assert EnergyModel().estimate(model, torch.zeros(1, 4)).macs == 12
    free = EnergyModel().with_rule(MyLinear, count_nothing).estimate(model, torch.zeros(1, 4))
    assert free.macs == 0
    # The most specific class wins: a rule for nn.Module does not replace the Linear rule.
    catch_all = EnergyModel().with_rule(nn.Module, count_nothing).with_rule(nn.Linear, count_linear)
    assert catch_all.estimate(nn.Linear(4, 3), torch.zeros(1, 4)).macs == 12


def test_rule_must_return_layer_count() -> None:
    energy = EnergyModel().with_rule(_Scale, lambda m, x, y: 3)
    with pytest.raises(NeuronEliminationError, match=r"'' \(_Scale\) returned int"):
        energy.estimate(_Scale(4), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------------
# Hook hygiene
# --------------------------------------------------------------------------------------------------


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def test_modes_restored_and_hooks_removed(mnist_batch: torch.Tensor) -> None:
    model = LeNet300100()
    model.train()
    model.fc2.eval()
    before = {name: m.training for name, m in model.named_modules()}
    EnergyModel().estimate(model, mnist_batch)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert _hook_count(model) == 0
    assert torch.is_grad_enabled()


def test_runs_in_eval_mode_without_grad() -> None:
    seen: list[tuple[bool, bool]] = []

    def rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerCount:
        seen.append((module.training, torch.is_grad_enabled()))
        return LayerCount()

    model = nn.Sequential(_Scale(3)).train()
    EnergyModel().with_rule(_Scale, rule).estimate(model, torch.zeros(1, 3))
    assert seen == [(False, False)]
    assert model.training and model[0].training


def test_hooks_removed_and_modes_restored_on_error() -> None:
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 4)), ("scale", _Scale(4))])).train()
    with pytest.raises(UnsupportedLayerError):
        EnergyModel().estimate(model, torch.zeros(2, 4))
    assert _hook_count(model) == 0
    assert all(m.training for m in model.modules())

    with pytest.raises(RuntimeError):  # shape mismatch inside forward
        EnergyModel().estimate(model, torch.zeros(2, 5))
    assert _hook_count(model) == 0
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------------------------------
# Report helpers and validation
# --------------------------------------------------------------------------------------------------


def test_ratios_reproduce_paper_memory_ratios() -> None:
    """LeNet-300-100 FC2 keeping 52 of fc1's 300 neurons: 17.64% memory, 5.67× (paper)."""
    energy = EnergyModel()
    x = torch.zeros(1, 1, 28, 28)
    original = energy.estimate(LeNet300100(), x)
    reduced_model = LeNet300100()
    reduced_model.fc1 = nn.Linear(784, 52)
    reduced_model.fc2 = nn.Linear(52, 100)
    reduced = energy.estimate(reduced_model, x)

    assert round(original.memory_ratio(reduced), 2) == 5.67
    assert round(100 / original.memory_ratio(reduced), 2) == 17.64
    ratio = original.ratio(reduced)
    assert ratio["params_bits"] == original.memory_ratio(reduced)
    assert ratio["total"] == original.energy_ratio(reduced) == original.total / reduced.total
    assert ratio["total_bits"] == original.memory_ratio(reduced, include_activations=True)
    assert original.ratio(original)["output_activations"] == 1.0


def test_as_dict() -> None:
    report = EnergyModel().estimate(LeNet300100(), torch.zeros(1, 784))
    flat = report.as_dict()
    assert "per_layer" not in flat
    assert flat["macs"] == 266_200
    assert flat["total"] == report.total
    with_layers = report.as_dict(per_layer=True)
    assert with_layers["fc2/weights"] == 30_000
    assert with_layers["fc3/activations"] == 100


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mac": -1.0}, "mac"),
        ({"sram_access": float("nan")}, "sram_access"),
        ({"dram_access": "640 pJ"}, "dram_access"),
        ({"bits_per_word": 0}, "bits_per_word"),
        ({"bits_per_word": 32.0}, "bits_per_word"),
        ({"rules": {int: count_nothing}}, "rules"),
        ({"rules": {nn.Linear: 3}}, "rules"),
    ],
)
def test_invalid_configuration(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}"):
        EnergyModel(**kwargs)


def test_with_rule_validates() -> None:
    with pytest.raises(ValueError, match="nn.Module"):
        EnergyModel().with_rule(str, count_nothing)  # type: ignore[arg-type]


def test_energy_model_is_immutable_and_hashable() -> None:
    energy = EnergyModel().with_rule(_Scale, _scale_rule)
    with pytest.raises(TypeError):
        energy.rules[nn.ReLU] = count_nothing  # type: ignore[index]
    assert hash(EnergyModel()) == hash(EnergyModel())
    assert EnergyModel() == EnergyModel()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"macs": -1}, ValueError), ({"weights": 1.5}, TypeError), ({"activations": True}, TypeError)],
)
def test_layer_count_validates(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        LayerCount(**kwargs)


def test_embedding_and_layernorm_rules() -> None:
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    )
    report = EnergyModel().estimate(model, torch.zeros(2, 5, dtype=torch.long))
    # per sequence of 5 tokens: LayerNorm 5·4 MACs, Linear 5·4·3; weights 40 + 4 + 12
    assert report.macs == 5 * 4 + 5 * 4 * 3
    assert report.weights == 40 + 4 + 12
    assert report.activations == 5 * 4 + 5 * 4 + 5 * 3


def test_a_report_pickles_for_the_ddp_broadcast() -> None:
    import pickle

    from torch import nn as tnn

    model = tnn.Sequential(tnn.Linear(4, 3), tnn.ReLU(), tnn.Linear(3, 2))
    report = EnergyModel().estimate(model, torch.zeros(1, 4))
    back = pickle.loads(pickle.dumps(report))
    assert back == report and dict(back.per_layer) == dict(report.per_layer)
    with pytest.raises(TypeError):
        back.per_layer["0"] = None  # type: ignore[index]
