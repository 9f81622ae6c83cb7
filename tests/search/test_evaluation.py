from __future__ import annotations

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search import evaluation
from lightning_neuronprune.search.evaluation import CachedEvaluator, batch_target, model_output
from lightning_neuronprune.structure.modules import linear_from


class _Skip(nn.Module):
    """A consumer whose input also feeds a later layer: the cache must keep both values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.head(torch.cat([torch.relu(self.bn(self.fc2(h))), h], dim=1))


class _Untraceable(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
            return super().forward(x)
        return x


def _data(generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(16, 6, generator=generator), torch.randint(0, 4, (16,), generator=generator))
        for _ in range(3)
    ]


def _reference(model: nn.Module, data, consumer: str, replacement: nn.Module | None) -> float:
    """The metric of a full forward pass, with the module swapped in by hand."""
    metric = MulticlassAccuracy(4, average="micro")
    parent, _, child = consumer.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    original = getattr(owner, child)
    if replacement is not None:
        setattr(owner, child, replacement)
    model.eval()
    with torch.no_grad():
        for x, y in data:
            metric.update(model(x), y)
    setattr(owner, child, original)
    model.train()
    return float(metric.compute())


def _probe(layer: nn.Linear, kept: torch.Tensor) -> nn.Linear:
    weight = layer.weight[:, kept].clone()
    return linear_from(weight, layer.bias.clone(), index=kept, source_features=layer.in_features)


def test_cached_evaluation_equals_a_full_forward_pass(generator: torch.Generator) -> None:
    model = _Skip()
    data = _data(generator)
    evaluator = CachedEvaluator(model, "fc2", data, MulticlassAccuracy(4, average="micro"))
    assert evaluator.cached
    assert evaluator() == _reference(model, data, "fc2", None)
    probe = _probe(model.fc2, torch.tensor([0, 2, 3, 7]))
    assert evaluator(probe) == _reference(model, data, "fc2", probe)
    assert evaluator.replaceable("head") and not evaluator.replaceable("fc1")
    # The model is left as it was: its own module back in place, modes restored.
    assert isinstance(model.fc2, nn.Linear) and model.training


def test_untraceable_model_falls_back_to_full_passes(generator: torch.Generator) -> None:
    model = _Untraceable(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    data = _data(generator)
    evaluator = CachedEvaluator(model, "2", data, MulticlassAccuracy(4, average="micro"))
    assert not evaluator.cached
    probe = _probe(model[2], torch.tensor([1, 4, 5]))
    assert evaluator(probe) == _reference(model, data, "2", probe)
    assert evaluator.replaceable("0")
    forced = CachedEvaluator(
        nn.Sequential(*model), "2", data, MulticlassAccuracy(4, average="micro"), cache=False
    )
    assert not forced.cached and forced(probe) == evaluator(probe)


def test_traced_front_that_cannot_run_falls_back_to_full_passes(
    generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split succeeds but the prefix fails on the real batches (e.g. an input the trace
    baked in): the evaluator runs full passes, with the same results."""
    split = evaluation._split

    def failing_prefix(model: nn.Module, consumer: str):
        prefix, suffix = split(model, consumer)

        def broken(*args: object) -> None:
            raise RuntimeError("the traced front cannot run this input")

        prefix.forward = broken
        return prefix, suffix

    monkeypatch.setattr(evaluation, "_split", failing_prefix)
    model = _Skip()
    data = _data(generator)
    evaluator = CachedEvaluator(model, "fc2", data, MulticlassAccuracy(4, average="micro"))
    assert not evaluator.cached
    probe = _probe(model.fc2, torch.tensor([0, 2, 3, 7]))
    assert evaluator(probe) == _reference(model, data, "fc2", probe)


def test_output_fn_and_3d_token_outputs(generator: torch.Generator) -> None:
    """Dict outputs (``logits``) and an ``output_fn`` pooling (B, T, C) logits."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.fc2(torch.relu(self.fc1(x)))}

    model = Tokens()
    data = [(torch.randn(5, 3, 6, generator=generator), torch.randint(0, 4, (5,)))]
    metric = MulticlassAccuracy(4, average="micro")
    pooled = CachedEvaluator(model, "fc2", data, metric, output_fn=lambda o: o["logits"][:, 0])
    with torch.no_grad():
        expected = metric(model_output(model(data[0][0]))[:, 0], data[0][1])
    assert pooled() == pytest.approx(float(expected))


def test_batch_target_and_empty_data() -> None:
    y = torch.tensor([1, 2])
    assert batch_target((torch.zeros(2), y)) is y
    assert batch_target({"x": torch.zeros(2), "labels": y}) is y
    with pytest.raises(NeuronEliminationError, match="cannot find the target"):
        batch_target(torch.zeros(2))
    with pytest.raises(NeuronEliminationError, match="evaluation data is empty"):
        CachedEvaluator(nn.Linear(2, 2), "", [], MulticlassAccuracy(2))


def test_default_metric_reads_the_class_count_and_restores_modes() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))
    model.train()
    model[1].eval()
    metric = evaluation.default_metric(model, torch.zeros(2, 6), top_k=9)
    assert isinstance(metric, MulticlassAccuracy)
    assert metric.num_classes == 5 and metric.top_k == 5  # top_k capped at the class count
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(ValueError, match=r"needs class scores.*\(2, 1\).*`metric=`"):
        evaluation.default_metric(nn.Linear(6, 1), torch.zeros(2, 6))


class _TrainingBranches(nn.Module):
    """Functional dropout and an ``if self.training:`` branch, on both sides of the consumer:
    fx bakes ``self.training`` into the graph as a constant at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(nn.functional.dropout(self.fc1(x), p=0.5, training=self.training))
        h = torch.relu(self.fc2(h))
        if self.training:
            h = -h
        return self.head(nn.functional.dropout(h, p=0.5, training=self.training))


def test_cache_is_traced_in_eval_mode_from_a_model_in_train_mode(
    generator: torch.Generator,
) -> None:
    """The callback builds the evaluator in ``on_train_end``, with the model in train mode; the
    cached graph must still be the eval-mode network (no dropout, no training branch)."""
    from torchmetrics.regression import MeanSquaredError

    model = _TrainingBranches().train()
    data = [
        (torch.randn(16, 6, generator=generator), torch.randn(16, 4, generator=generator))
        for _ in range(3)
    ]
    evaluator = CachedEvaluator(model, "fc2", data, MeanSquaredError())
    assert evaluator.cached
    assert model.training  # the mode is restored after tracing
    model.eval()
    with torch.no_grad():
        outputs = torch.cat([model(x) for x, _ in data])
        targets = torch.cat([y for _, y in data])
        expected = float(((outputs - targets) ** 2).mean())
    model.train()
    for _ in range(2):  # deterministic: no dropout runs in the cached prefix or suffix
        assert evaluator() == pytest.approx(expected, rel=1e-6)
    assert model.training


class _InPlaceSuffix(nn.Module):
    """The consumer's input is updated in place after the consumer (a residual ``add_``, an
    in-place op on a view, an update read under the old name), so a suffix run on the cached
    prefix outputs would rewrite them."""

    def __init__(self, update: str) -> None:
        super().__init__()
        self.update = update
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if self.update == "add_":
            h = h.add_(torch.relu(self.fc2(h)))
        elif self.update == "view":  # an in-place op on a view of the cached value
            h = h.unsqueeze(0).mul_(torch.sigmoid(self.fc2(h))).squeeze(0)
        else:  # the updated h is read under its old name: fx splits head(h) before the update
            y = torch.relu(self.fc2(h))
            h.add_(y)
            return self.head(h) + y[:, :4]
        return self.head(h)


@pytest.mark.parametrize("update", ["add_", "view", "reread"])
def test_in_place_suffix_does_not_corrupt_the_cache(
    generator: torch.Generator, update: str
) -> None:
    """Three evaluations of the unchanged model give the same value, that of a full pass."""
    from torchmetrics.regression import MeanSquaredError

    model = _InPlaceSuffix(update)
    data = [
        (torch.randn(16, 6, generator=generator), torch.randn(16, 4, generator=generator))
        for _ in range(3)
    ]
    with torch.no_grad():
        expected = float(torch.cat([(model(x) - y) ** 2 for x, y in data]).mean())
    evaluator = CachedEvaluator(model, "fc2", data, MeanSquaredError())
    assert evaluator.cached == (update != "reread")  # a split that differs: full passes
    values = [evaluator() for _ in range(3)]
    assert values == [values[0]] * 3  # the unchanged model gives the same value on every call
    assert values[0] == pytest.approx(expected, rel=1e-6)
    probe = _probe(model.fc2, torch.tensor([0, 2, 3, 7]))
    assert evaluator(probe) == evaluator(probe)


class _ConvNet(nn.Module):
    """conv → BN → ReLU → pool → conv → BN → ReLU → pool → flatten → Linear; with ``view``, the
    flatten is ``x.view(x.size(0), -1)``, which a channels-last map cannot take."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 2 * 2, 4)
        self.view = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        h = torch.max_pool2d(torch.relu(self.bn2(self.conv2(h))), 2)
        return self.fc(h.view(h.size(0), -1) if self.view else h.flatten(1))


@pytest.mark.parametrize("view", [False, True])
def test_conv_feature_maps_are_cached_channels_last_on_the_cpu(
    generator: torch.Generator, view: bool
) -> None:
    """On the CPU the cached conv feature maps are kept channels-last (the suffix runs several
    times faster), with the metric of a full forward pass; a suffix that cannot take that layout
    keeps the default one."""
    torch.manual_seed(0)
    model = _ConvNet(view).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 8, 2, 8, 8, generator=generator)
    data = list(zip(x, torch.randint(0, 4, (3, 8), generator=generator), strict=True))
    evaluator = CachedEvaluator(model, "conv2", data, MulticlassAccuracy(4, average="micro"))
    assert evaluator.cached
    assert evaluator.channels_last is not view
    probe = nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        probe.weight.copy_(model.conv2.weight)
        probe.weight[:, [1, 4]] = 0.0
    assert evaluator(probe) == _reference(model, data, "conv2", probe)
    assert evaluator() == _reference(model, data, "conv2", None)
    # the model's own parameters keep their layout
    assert model.conv2.weight.is_contiguous()
    off = CachedEvaluator(
        model, "conv2", data, MulticlassAccuracy(4, average="micro"), channels_last=False
    )
    assert off.cached and not off.channels_last
    assert off(probe) == evaluator(probe)
