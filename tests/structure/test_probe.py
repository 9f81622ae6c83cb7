from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformer_blocks import (
    FFN,
    Encoder,
    Mlp,
    NewGELU,
    QuickGELU,
    SwiGLU,
    TimmBlock,
    TorchvisionEncoderBlock,
    Wrapper,
)

from lightning_neuronprune.errors import JunctionError, UndecidedJunctionError
from lightning_neuronprune.search.elimination import eliminate_neurons
from lightning_neuronprune.structure.discovery import auto_junctions, find_junction
from lightning_neuronprune.structure.probe import JunctionProbe


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "act", [QuickGELU(), NewGELU(), Wrapper(nn.GELU()), Wrapper(QuickGELU()), nn.Mish()],
    ids=["QuickGELU", "NewGELU", "wrapped-GELU", "wrapped-QuickGELU", "Mish"],
)  # fmt: skip
def test_custom_activations_are_accepted_by_behaviour(seed: int, act: nn.Module) -> None:
    model = FFN(act)
    x = torch.randn(5, 6)
    with pytest.raises(UndecidedJunctionError, match="could not be traced"):
        find_junction(model, "fc1")
    j = find_junction(model, "fc1", example=x)
    assert (j.producer, j.consumer, j.batchnorm, j.kind) == ("fc1", "fc2", None, "producer")
    assert j.path[0].startswith("act")


def test_transformers_activation_modules_are_accepted(seed: int) -> None:
    activations = pytest.importorskip("transformers.activations")
    for act in (activations.GELUActivation(), activations.NewGELUActivation(),
                activations.QuickGELUActivation()):  # fmt: skip
        j = find_junction(FFN(act), "fc1", example=torch.randn(5, 6))
        assert j.consumer == "fc2"


class Scale(nn.Module):
    """An elementwise op with per-feature parameters: accepted by behaviour, but not sliceable."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((n,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TwoConsumers(FFN):
    def __init__(self, act: nn.Module) -> None:
        super().__init__(act)
        self.side = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.out(torch.relu(self.fc2(h))) + self.side(h)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.relu(h)) + h


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.relu(self.fc(x))))


class GateReadTwice(SwiGLU):
    """The gate's output also bypasses the product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        return self.down(F.silu(g) * self.up(x)) + g[..., : x.shape[-1]]


class Permuted(FFN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x)).flip(-1)
        return self.out(torch.relu(self.fc2(h)))


@pytest.mark.parametrize(
    ("model", "target", "message"),
    [
        (FFN(nn.GELU(), nn.LayerNorm(12)), "fc1", "mixes features"),
        (FFN(nn.GELU(), nn.Softmax(-1)), "fc1", "mixes features"),
        (Permuted(nn.ReLU()), "fc1", "mixes features"),
        (FFN(nn.GELU(), Scale(12)), "fc1", "per-feature parameters"),
        (TwoConsumers(nn.GELU()), "fc1", "feeds 2 nn.Linear layers \\['fc2', 'side'\\]"),
        (Residual(), "fc1", "reaches the network output other than through its consumer"),
        (FFN(nn.GELU()), "out", "it is \\(or flows into\\) the network output"),
        (Reused(), "fc", "runs 2 times"),
        (Encoder([TimmBlock(mlp=GateReadTwice(16, 32))], untraceable=True), "blocks.0.mlp.gate",
         "feeds 2 nn.Linear layers \\['blocks.0.mlp.down', 'head'\\].*a gate read twice"),
        (Encoder([TimmBlock()], untraceable=True), "blocks.0.attn.qkv",
         "reaches 'blocks.0.attn.proj', which reads 16 features"),
    ],
    ids=["layernorm", "softmax", "permutation", "scale", "two-consumers", "residual", "output",
         "reused", "gate-read-twice", "attention-qkv"],
)  # fmt: skip
def test_refusals_name_the_problem(seed: int, model: nn.Module, target: str, message: str) -> None:
    x = torch.randn(4, 5, 6) if isinstance(model, Encoder) else torch.randn(5, 6)
    model.train()
    state = _state(model)
    with pytest.raises(JunctionError, match=message):
        find_junction(model, target, example=x)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(_state(model), state, rtol=0, atol=0)
    assert type(model.get_submodule(target)) is nn.Linear  # originals restored after narrowing


def test_probe_cost_determinism_and_untouched_model(seed: int) -> None:
    model = FFN(QuickGELU())
    model.train()
    state = _state(model)
    x = torch.randn(5, 6)
    probe = JunctionProbe(model, x)
    assert probe.passes == 1  # the shared baseline
    first = probe.find("fc1")
    # reach + narrowing + 2 ⌈log2 n⌉ bit patterns
    assert first.passes == 2 + 2 * math.ceil(math.log2(12))
    assert JunctionProbe(model, x).find("fc1") == first
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(_state(model), state, rtol=0, atol=0)


def test_dead_relu_neurons_still_map_one_to_one(seed: int) -> None:
    model = FFN(nn.ReLU(), untraceable=False)
    with torch.no_grad():
        model.fc1.bias[:6] = -100.0  # dead on every sample
    assert find_junction(model, "fc1", example=torch.randn(5, 6)).consumer == "fc2"


def test_batchnorm_on_the_path_agrees_with_tracing(seed: int) -> None:
    model = nn.Sequential(
        nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.2), nn.Linear(10, 3)
    )
    model(torch.randn(32, 6))  # running statistics
    traced = find_junction(model, "0")
    probed = find_junction(model, "0", example=torch.randn(8, 6))
    assert traced == probed
    assert (probed.consumer, probed.batchnorm) == ("4", "1")


def test_tracing_cross_check_disagreement_is_refused(seed: int) -> None:
    model = FFN(nn.GELU(), untraceable=False)
    probe = JunctionProbe(model, torch.randn(5, 6))

    class Wrong:
        def find(self, producer: str):
            return probe.find(producer).__class__(producer, "out", None, (), 0)

    with pytest.raises(JunctionError, match="tracing and probing disagree"):
        find_junction(model, "fc1", probe=Wrong())  # type: ignore[arg-type]


def test_explicit_consumer_is_checked_by_the_probe(seed: int) -> None:
    model = FFN(QuickGELU())
    x = torch.randn(5, 6)
    assert find_junction(model, "fc1", "fc2", example=x).consumer == "fc2"
    with pytest.raises(JunctionError, match="not the given consumer 'out'"):
        find_junction(model, "fc1", "out", example=x)


@pytest.mark.parametrize("untraceable", [False, True])
def test_auto_finds_torchvision_and_timm_ffn_pairs(seed: int, untraceable: bool) -> None:
    model = Encoder(
        [TorchvisionEncoderBlock(), TimmBlock(), TimmBlock(mlp=Mlp(16, 32, act_layer=QuickGELU)),
         TimmBlock(mlp=SwiGLU(16, 32))],
        untraceable=untraceable,
    ).eval()  # fmt: skip
    found = [(j.producer, j.consumer) for j in auto_junctions(model, example=torch.randn(3, 5, 6))]
    assert found == [
        ("blocks.0.mlp.0", "blocks.0.mlp.3"),
        ("blocks.1.mlp.fc1", "blocks.1.mlp.fc2"),
        ("blocks.2.mlp.fc1", "blocks.2.mlp.fc2"),
        ("blocks.3.mlp.gate", "blocks.3.mlp.down"),
    ]


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=40, max_position_embeddings=16)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **common)
        return transformers.DistilBertModel(cfg)
    if kind == "vit":
        cfg = transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            image_size=8, patch_size=4, num_channels=1,
        )  # fmt: skip
        return transformers.ViTModel(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=32, **common,
        )  # fmt: skip
        return transformers.LlamaModel(cfg)
    config = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[kind]
    model = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel}[kind]
    return model(
        config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               **common)
    )  # fmt: skip


def _hf_input(kind: str) -> dict[str, torch.Tensor]:
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 1, 8, 8)}
    ids = torch.randint(0, 40, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("kind", "pairs"),
    [
        ("bert", [("encoder.layer.{i}.intermediate.dense", "encoder.layer.{i}.output.dense")]),
        ("roberta", [("encoder.layer.{i}.intermediate.dense", "encoder.layer.{i}.output.dense")]),
        ("distilbert", [("transformer.layer.{i}.ffn.lin1", "transformer.layer.{i}.ffn.lin2")]),
        ("vit", None),
        ("llama", [("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.down_proj")]),
    ],
)
def test_auto_on_tiny_hugging_face_models(seed: int, kind: str, pairs: list | None) -> None:
    model = _hf(kind).eval()
    found = [(j.producer, j.consumer) for j in auto_junctions(model, example=_hf_input(kind))]
    if pairs is None:  # ViT's module names differ between transformers versions
        assert len(found) == 2
        assert all(p.endswith(("intermediate.dense", "fc1")) for p, _ in found)
        assert all(c.endswith(("output.dense", "fc2")) for _, c in found)
    else:
        assert found == [(p.format(i=i), c.format(i=i)) for i in range(2) for p, c in pairs]


def test_hf_bert_duplicate_neurons_are_removed_losslessly(seed: int) -> None:
    model = _hf("bert").eval()
    dense = model.encoder.layer[0].intermediate.dense
    with torch.no_grad():  # neurons 16..31 copy neurons 0..15: rank 16 of 32
        dense.weight[16:] = dense.weight[:16]
        dense.bias[16:] = dense.bias[:16]
    batch = _hf_input("bert")
    target = "encoder.layer.0.intermediate.dense"
    with pytest.raises(UndecidedJunctionError):
        find_junction(model, target)
    reduced, (rec,) = eliminate_neurons(model, target, 16, [batch], example=batch)
    assert rec.consumer == "encoder.layer.0.output.dense"
    assert reduced.encoder.layer[0].intermediate.dense.out_features == 16
    assert reduced.encoder.layer[0].output.dense.in_features == 16
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = reduced(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_consumer_reached_through_functional_ops(seed: int) -> None:
    class Inline(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            return self.fc2(h * torch.sigmoid(1.702 * h) + F.relu(h))  # inline, two uses of h

    with pytest.raises(UndecidedJunctionError, match="feeds"):
        find_junction(Inline(), "fc1")
    assert find_junction(Inline(), "fc1", example=torch.randn(4, 6)).consumer == "fc2"


@pytest.mark.parametrize(
    "act", [nn.LeakyReLU(inplace=True), nn.ELU(inplace=True)], ids=["LeakyReLU", "ELU"]
)
def test_inplace_activations_do_not_corrupt_the_baseline(seed: int, act: nn.Module) -> None:
    """An in-place activation after an ``nn.Linear`` whose baseline output the probe returns (to
    stop the perturbation there) must not rewrite the stored baseline: every pass after the first
    would then see the consumer of that layer change too."""
    model = nn.Sequential(nn.Linear(6, 10), act, nn.Linear(10, 8), act, nn.Linear(8, 3))
    x = torch.randn(16, 6)
    with torch.no_grad():
        expected = model(x.clone())
    probe = JunctionProbe(model, x)
    stored = {k: [t.clone() for t in v] for k, v in probe.baseline.outputs.items()}
    for _ in range(2):  # the probe's answer does not depend on earlier passes
        found = probe.find("0")
        assert (found.consumer, found.batchnorm) == ("2", None)
    assert probe.find("2").consumer == "4"
    for name, outputs in stored.items():
        torch.testing.assert_close(probe.baseline.outputs[name], outputs, rtol=0, atol=0)
    assert [(j.producer, j.consumer) for j in auto_junctions(model, example=x)] == [
        ("0", "2"),
        ("2", "4"),
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x.clone()), expected)


def _deep_mlp(depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(6, 10)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(10, 10)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(10, 3))


def test_probe_reads_the_host_per_pass_not_per_layer(seed: int, host_reads) -> None:
    """The changed features of every nn.Linear call stay on the device during a pass and come
    to the host in one read; the reads of device values as numbers or copies (``float``,
    ``item``, ``cpu``) do not grow with the number of layers."""
    x = torch.randn(8, 6)
    reads, results = [], []
    for depth in (1, 6):
        model = _deep_mlp(depth)
        probe = JunctionProbe(model, x)
        before = dict(host_reads.counts)
        results.append(probe.find("0"))
        reads.append(
            sum(host_reads.counts[k] - before.get(k, 0) for k in ("__float__", "item", "cpu"))
        )
    assert [(r.consumer, r.batchnorm, r.path, r.passes) for r in results] == [
        ("2", None, ("1 (ReLU)",), 2 + 2 * math.ceil(math.log2(10)))
    ] * 2
    assert reads[0] == reads[1]


def test_changed_features_match_the_host_rule(generator: torch.Generator) -> None:
    """Feature j changed where ``max |new - old| > tol (max |old| + tol)``, as read on the host."""
    from lightning_neuronprune.structure.perturbation import TOLERANCE
    from lightning_neuronprune.structure.perturbation import changed_features as _changed_features

    old = torch.randn(4, 3, 7, generator=generator)
    new = old.clone()
    scale = float(old.abs().max())
    new[1, 2, 1] += 2 * TOLERANCE * (scale + TOLERANCE)  # above the threshold
    new[0, 0, 4] += 0.5 * TOLERANCE * (scale + TOLERANCE)  # below
    new[3, 1, 6] = float("nan")  # NaN is not a change (the comparison is false)
    expected = torch.zeros(7, dtype=torch.bool)
    expected[1] = True
    assert _changed_features(new, old).tolist() == expected.tolist()
    assert _changed_features(new[..., :5], old).tolist() == [True] * 5  # another shape


class FusedGLU(nn.Module):
    """Phi-3's MLP behind an untraceable forward: ``down(up * silu(gate))`` on the halves of one
    producer."""

    def __init__(self, n: int = 12) -> None:
        super().__init__()
        self.gate_up = nn.Linear(6, 2 * n)
        self.down = nn.Linear(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent control flow: fx cannot trace
            x = x + 0
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.silu(gate))


def test_gated_junctions_are_found_from_either_producer_at_a_known_cost(seed: int) -> None:
    model = Encoder([TimmBlock(mlp=SwiGLU(16, 32))], untraceable=True).eval()
    probe = JunctionProbe(model, torch.randn(2, 5, 6))
    bits = math.ceil(math.log2(32))
    for producer in ("blocks.0.mlp.gate", "blocks.0.mlp.up"):
        found = probe.find(producer)
        assert found.producers == ("blocks.0.mlp.gate", "blocks.0.mlp.up")
        assert (found.producer, found.consumer, found.fused) == (
            "blocks.0.mlp.gate", "blocks.0.mlp.down", False
        )  # fmt: skip
        # reach and first pattern of each producer, narrowing, the other patterns on both
        assert found.passes == 4 + 2 * bits

    fused = JunctionProbe(FusedGLU(), torch.randn(5, 6)).find("gate_up")
    assert (fused.producers, fused.consumer, fused.fused) == (("gate_up",), "down", True)
    assert fused.passes == 2 + 4 * math.ceil(math.log2(12))  # each half mapped in turn
    j = find_junction(FusedGLU(), "gate_up", example=torch.randn(5, 6))
    assert (j.kind, j.num_features, j.modules) == ("gated", 12, ("gate_up", "down"))


def test_a_model_that_fails_on_the_example_is_a_junction_error(seed: int) -> None:
    with pytest.raises(JunctionError, match="fails on the probe's example .*RuntimeError"):
        JunctionProbe(FFN(nn.ReLU()), torch.randn(5, 7))
