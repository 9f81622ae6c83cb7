"""Reduced models through every checkpoint idiom: plans in state dicts, Lightning checkpoints,
``load_from_checkpoint``, resuming, ``weights="best"`` and ``test(ckpt_path="best")``."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lit_models import BlobsData, LitMLP, ReducibleLitMLP, applied, tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_neuronprune import (
    CheckpointMismatchError,
    NeuronEliminationCallback,
    eliminate_neurons,
    install_plan_hook,
    load_reduced,
    match_plan,
    read_plan,
    rebind_optimizer,
    rebuild_shapes,
)
from lightning_neuronprune.structure.persistence import write_plan

# ------------------------------------------------------------------ functional core


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.fixture
def data(generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(32, 6, generator=generator) for _ in range(4)]


@pytest.fixture
def reduced(seed: int, data: list[torch.Tensor]) -> tuple[nn.Sequential, nn.Sequential]:
    """``(original, reduced)``: 10 → 4 neurons in layer 0 and 8 → 5 in layer 2."""
    original = _net()
    model, _ = eliminate_neurons(original, {"0": 4, "2": 5}, data=data)
    return original, model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)


def test_match_plan_rebuilds_a_fresh_model(
    reduced: tuple[nn.Sequential, nn.Sequential], data: list[torch.Tensor]
) -> None:
    _, model = reduced
    fresh = _net()
    assert match_plan(fresh, model.state_dict()) == [""]
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].out_features == 4 and fresh[2].in_features == 4 and fresh[4].in_features == 5
    torch.testing.assert_close(fresh(data[0]), model(data[0]), rtol=0, atol=0)
    assert read_plan(fresh) == read_plan(model)


class _Gated(nn.Module):
    """A SwiGLU block and a fused (Phi-3) one, one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 6)
        self.gate_up, self.out = nn.Linear(6, 16), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(F.silu(self.gate(x)) * self.up(x))
        g, u = self.gate_up(h).chunk(2, dim=-1)
        return self.out(u * F.gelu(g))


def test_gated_plans_replay_every_producer_on_a_fresh_model(
    seed: int, data: list[torch.Tensor]
) -> None:
    model, records = eliminate_neurons(_Gated(), {"up": 4, "gate_up": 5}, data=data)
    assert [(r.kind, r.producers, r.fused) for r in records] == [
        ("gated", ("gate", "up"), False),
        ("gated", ("gate_up",), True),
    ]
    fresh = _Gated()
    load_reduced(fresh, model.state_dict())
    assert (fresh.gate.out_features, fresh.up.out_features, fresh.gate_up.out_features) == (
        4,
        4,
        10,
    )
    torch.testing.assert_close(fresh(data[0]), model(data[0]), rtol=0, atol=0)
    legacy = [{k: v for k, v in rec.items() if k not in ("producers", "fused")} for rec in
              read_plan(_net_reduced(data))]  # fmt: skip
    older = _net()
    rebuild_shapes(older, legacy)  # records written before gated junctions still replay
    assert older[0].out_features == 4


def _net_reduced(data: list[torch.Tensor]) -> nn.Module:
    return eliminate_neurons(_net(), {"0": 4}, data=data).model


def test_conv_plans_replay_and_mismatches_name_the_conv(generator: torch.Generator) -> None:
    """LeNet-5 reduced at conv1 → conv2 and conv2 → fc1 (a BatchNorm2d-free Caffe net), and a
    conv → BatchNorm2d → conv net: fresh instances get the shapes and identical outputs."""
    from lightning_neuronprune.testing.models import LeNet5

    x = torch.randn(8, 1, 28, 28, generator=generator)
    original = LeNet5()
    model, _ = eliminate_neurons(original, {"conv1": 7, "conv2": 11}, data=[x], affine=True)
    fresh = LeNet5()
    assert match_plan(fresh, model.state_dict()) == [""]
    fresh.load_state_dict(model.state_dict())
    assert (fresh.conv1.out_channels, fresh.conv2.weight.shape[:2]) == (7, (11, 7))
    assert fresh.fc1.in_features == 11 * 16
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    state = _state(model)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"\(conv1 keeps 7 of 20, conv2 keeps 11 of 50\): layer 'conv1': `conv1.weight` is "
        r"\(7, 1, 5, 5\) in the model and \(20, 1, 5, 5\) in the state dict",
    ):
        model.load_state_dict(original.state_dict())
    assert _same(model, state)

    bn = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3, padding=1)
    ).eval()
    small, _ = eliminate_neurons(bn, "0", 4, data=[x])
    again = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3, padding=1)
    )
    again = load_reduced(again, small.state_dict()).eval()
    assert again[1].num_features == 4 and again[1].running_mean.shape == (4,)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


def test_unreduced_models_and_state_dicts_load_as_before(seed: int) -> None:
    model, other = _net(), _net()
    install_plan_hook(model)
    assert match_plan(model, other.state_dict()) == []
    model.load_state_dict(other.state_dict())
    assert _same(model, other.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):  # PyTorch's own checks are unchanged
        model.load_state_dict({k: v for k, v in other.state_dict().items() if k != "0.bias"})


def test_unreduced_state_dict_into_reduced_model_names_layer_and_shapes(
    reduced: tuple[nn.Sequential, nn.Sequential],
) -> None:
    original, model = reduced
    state = _state(model)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"unreduced state dict into a reduced Sequential \(0 keeps 4 of 10, 2 keeps 5 of 8\)"
        r": layer '0': `0.weight` is \(4, 6\) in the model and \(10, 6\) in the state dict.*"
        r"load_reduced",
    ):
        model.load_state_dict(original.state_dict())
    assert _same(model, state)


def test_differently_reduced_state_dict_is_refused(
    reduced: tuple[nn.Sequential, nn.Sequential], data: list[torch.Tensor]
) -> None:
    original, model = reduced
    other, _ = eliminate_neurons(original, {"0": 3}, data=data)
    state = _state(model)
    with pytest.raises(CheckpointMismatchError, match=r"reduced as \(0 keeps 3 of 10\).*\(3, 6\)"):
        model.load_state_dict(other.state_dict())
    assert _same(model, state)


def test_further_reduced_state_dict_replays_only_the_new_records(
    seed: int, data: list[torch.Tensor]
) -> None:
    once, _ = eliminate_neurons(_net(), {"0": 4}, data=data)
    twice, _ = eliminate_neurons(once, {"2": 5}, data=data)
    copy_of_once = copy.deepcopy(once)  # the guard hook travels with deep copies
    copy_of_once.load_state_dict(twice.state_dict())
    assert copy_of_once[2].out_features == 5 and len(read_plan(copy_of_once)) == 2
    torch.testing.assert_close(copy_of_once(data[1]), twice(data[1]), rtol=0, atol=0)


def test_plan_that_cannot_be_replayed_leaves_model_untouched(
    reduced: tuple[nn.Sequential, nn.Sequential],
) -> None:
    _, model = reduced
    wrong = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8))  # no layer "4"
    state = _state(wrong)
    with pytest.raises(CheckpointMismatchError, match=r"cannot replay .*on Sequential"):
        load_reduced(wrong, model.state_dict())
    assert _same(wrong, state) and read_plan(wrong) == []
    with pytest.raises(CheckpointMismatchError, match=r"submodule 'net'.*does not have"):
        match_plan(_net(), {"net.neuron_elimination_plan": model.neuron_elimination_plan})


def test_nested_plan_is_found_under_its_prefix(
    reduced: tuple[nn.Sequential, nn.Sequential], data: list[torch.Tensor]
) -> None:
    _, model = reduced
    outer, fresh = nn.ModuleDict({"net": model}), nn.ModuleDict({"net": _net()})
    install_plan_hook(fresh)
    fresh.load_state_dict(outer.state_dict())
    torch.testing.assert_close(fresh["net"](data[2]), model(data[2]), rtol=0, atol=0)


def test_rebind_optimizer_drops_only_the_reduced_layers_state(
    seed: int, data: list[torch.Tensor]
) -> None:
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(data[0]).sum().backward()
    optimizer.step()
    before = dict(model.named_parameters())
    untouched = optimizer.state[model[4].weight]["exp_avg"].clone()
    eliminate_neurons(model, "0", 4, data=data, inplace=True)  # replaces layers 0 and 2
    changed = rebind_optimizer(optimizer, before, model)
    assert sorted(changed) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    assert model[0].weight not in optimizer.state and model[2].weight not in optimizer.state
    assert torch.equal(optimizer.state[model[4].weight]["exp_avg"], untouched)
    optimizer.zero_grad()
    model(data[1]).sum().backward()
    optimizer.step()  # the reduced shapes step without error
    assert optimizer.state[model[2].weight]["exp_avg"].shape == (8, 4)


def test_rebind_optimizer_inserts_a_new_bias_after_its_weight(
    seed: int, data: list[torch.Tensor]
) -> None:
    model = nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8, bias=False), nn.Linear(8, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = dict(model.named_parameters())
    eliminate_neurons(model, "0", 4, data=data, inplace=True, affine=True)  # layer 2 gets a bias
    assert model[2].bias is not None
    rebind_optimizer(optimizer, before, model)
    assert optimizer.param_groups[0]["params"] == list(model.parameters())


# ------------------------------------------------------------------ Lightning idioms


_trainer = functools.partial(tiny_trainer, max_epochs=3, enable_checkpointing=True)


def _val() -> torch.Tensor:
    dm = BlobsData()
    dm.setup()
    return dm.val_set.tensors[0]


@pytest.fixture
def best_run(tmp_path: Path, seed: int) -> tuple[LitMLP, pl.Trainer, NeuronEliminationCallback]:
    """A fit whose "best" checkpoint is not its last (mode="max" on the loss picks an early
    epoch), reduced with ``weights="best"``."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val_loss", mode="max", save_top_k=-1
    )
    callback = NeuronEliminationCallback(
        targets=["net.2"], ranks=[10, 7, 5], apply={"net.2": 7}, weights="best", verbose=False
    )
    model = LitMLP()
    trainer = _trainer(tmp_path, [checkpoint, callback])
    trainer.fit(model, datamodule=BlobsData())
    return model, trainer, callback


def test_weights_best_reduces_the_best_checkpoint(
    best_run: tuple[LitMLP, pl.Trainer, NeuronEliminationCallback], tmp_path: Path
) -> None:
    model, trainer, callback = best_run
    best = trainer.checkpoint_callback.best_model_path
    assert callback.source_checkpoint_path == best
    best_state = torch.load(best, weights_only=True)["state_dict"]
    last = tmp_path / "ckpt" / f"epoch=2-step={trainer.global_step}.ckpt"
    last_state = torch.load(last, weights_only=True)["state_dict"]
    assert not torch.equal(best_state["net.0.weight"], last_state["net.0.weight"])
    # net.0 is outside the junction (net.2 → net.4): it holds the best weights, unchanged.
    assert torch.equal(model.net[0].weight, best_state["net.0.weight"])
    kept = list(read_plan(model)[0]["kept"])
    assert torch.equal(model.net[2].weight, best_state["net.2.weight"][kept])


def test_reduced_checkpoint_is_written_next_to_the_others_and_reported(
    best_run: tuple[LitMLP, pl.Trainer, NeuronEliminationCallback], tmp_path: Path
) -> None:
    model, trainer, callback = best_run
    path = Path(callback.reduced_checkpoint_path)
    assert path.parent == tmp_path / "ckpt"
    assert path.name == Path(callback.source_checkpoint_path).stem + "-reduced.ckpt"
    report = json.loads(Path(callback.report_paths[0]).read_text())
    assert report["reduced_checkpoint"] == str(path) and report["weights"] == "best"
    assert report["source_checkpoint"] == callback.source_checkpoint_path
    checkpoint = torch.load(path, weights_only=True)  # plain data only
    assert checkpoint["state_dict"]["net.2.weight"].shape == (7, 24)
    params = list(model.parameters())
    states = checkpoint["optimizer_states"][0]["state"]
    for i, state in states.items():  # resumable: every state fits its parameter
        assert state["exp_avg"].shape == params[i].shape
    assert len(states) == 2  # net.0 keeps its moments; the reduced net.2 and net.4 start afresh


def test_test_ckpt_best_after_reduction_names_the_reduced_checkpoint(
    best_run: tuple[LitMLP, pl.Trainer, NeuronEliminationCallback],
) -> None:
    model, trainer, callback = best_run
    state = copy.deepcopy(model.state_dict())
    path = callback.reduced_checkpoint_path
    with pytest.raises(
        CheckpointMismatchError,
        match=r"unreduced state dict into a reduced LitMLP \(net\.2 keeps 7 of 16\): layer "
        r"'net\.2': `net\.2\.weight` is \(7, 24\) in the model and \(16, 24\) in the state dict\."
        rf".*pass `ckpt_path='{path}'`",
    ):
        trainer.test(model, datamodule=BlobsData(), ckpt_path="best", verbose=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # What the message says to do: the reduced checkpoint, or the model as it is.
    (from_file,) = trainer.test(model, datamodule=BlobsData(), ckpt_path=path, verbose=False)
    (in_memory,) = trainer.test(model, datamodule=BlobsData(), verbose=False)
    assert from_file == in_memory and in_memory["test_acc"] > 0.8


def test_load_from_checkpoint_gives_identical_outputs(
    best_run: tuple[LitMLP, pl.Trainer, NeuronEliminationCallback],
) -> None:
    model, _, callback = best_run
    loaded = ReducibleLitMLP.load_from_checkpoint(callback.reduced_checkpoint_path)
    x = _val()
    model.eval()
    assert loaded.net[2].out_features == 7 and read_plan(loaded) == read_plan(model)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # Unreduced checkpoints load exactly as before, with or without the mixin.
    best = callback.source_checkpoint_path
    for cls in (LitMLP, ReducibleLitMLP):
        plain = cls.load_from_checkpoint(best)
        assert plain.net[2].out_features == 16 and read_plan(plain) == []
    # Without the mixin, load_reduced needs no change to the class.
    again = load_reduced(LitMLP(), callback.reduced_checkpoint_path)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["mixin", "callback"])
def test_resume_from_reduced_checkpoint_trains_one_more_epoch(
    best_run: tuple[LitMLP, pl.Trainer, NeuronEliminationCallback], tmp_path: Path, how: str
) -> None:
    model, trainer, callback = best_run
    steps = trainer.global_step
    if how == "mixin":  # one line on the class
        fresh: LitMLP = ReducibleLitMLP()
        callbacks: list[pl.Callback] = []
    else:  # no change to the class: the callback in the Trainer rebuilds the shapes
        fresh = LitMLP()
        callbacks = [NeuronEliminationCallback(targets=["net.2"], apply=None, verbose=False)]
    resumed = _trainer(tmp_path / how, callbacks, max_epochs=4, enable_checkpointing=False)
    resumed.fit(fresh, datamodule=BlobsData(), ckpt_path=callback.reduced_checkpoint_path)
    assert resumed.current_epoch == 4 and resumed.global_step == steps + 8
    assert fresh.net[2].out_features == 7 and read_plan(fresh) == read_plan(model)
    assert not torch.equal(fresh.net[2].weight, model.net[2].weight)  # it trained
    optimizer = resumed.optimizers[0]
    assert optimizer.param_groups[0]["params"] == list(fresh.parameters())
    for p in fresh.parameters():
        assert optimizer.state[p]["exp_avg"].shape == p.shape


def test_weights_best_without_model_checkpoint_is_refused(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(targets=["net.0"], weights="best", verbose=False)
    model = LitMLP()
    state = copy.deepcopy(model.state_dict())
    trainer = _trainer(tmp_path, [callback], enable_checkpointing=False)
    with pytest.raises(MisconfigurationException, match=r"weights='best'.*no ModelCheckpoint"):
        trainer.fit(model, datamodule=BlobsData())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_weights_argument_is_validated() -> None:
    with pytest.raises(MisconfigurationException, match=r"`weights` must be one of .*'first'"):
        NeuronEliminationCallback(weights="first")


def test_no_checkpoint_written_without_model_checkpoint(tmp_path: Path, seed: int) -> None:
    callback = NeuronEliminationCallback(
        targets=["net.2"], ranks=[7], apply={"net.2": 7}, verbose=False
    )
    model = LitMLP()
    _trainer(tmp_path, [callback], enable_checkpointing=False, max_epochs=2).fit(
        model, datamodule=BlobsData()
    )
    assert applied(callback) and callback.reduced_checkpoint_path is None
    assert not list(tmp_path.rglob("*.ckpt"))
    with pytest.raises(CheckpointMismatchError, match="in memory only.*without `ckpt_path`"):
        model.load_state_dict(LitMLP().state_dict())


def test_plan_hook_is_installed_once(seed: int) -> None:
    model = _net()
    for _ in range(3):
        install_plan_hook(model)
        write_plan(model, [])
    assert len(model._load_state_dict_pre_hooks) == 1
