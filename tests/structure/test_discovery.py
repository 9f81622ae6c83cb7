from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.discovery import find_junction
from lightning_neuronprune.testing.models import LeNet5, LeNet300100


class Functional(nn.Module):
    """An ordinary module whose forward calls submodules and functions."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
        self.bn = nn.BatchNorm1d(6) if bn else nn.Identity()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h = F.dropout(F.relu(self.bn(h)), 0.1, self.training)
        return self.head(h)


def test_sequential_junctions() -> None:
    model = LeNet300100()
    j = find_junction(model, "fc1")
    assert (j.kind, j.producer, j.consumer, j.num_features) == ("producer", "fc1", "fc2", 300)
    assert find_junction(model, "fc2:in") == find_junction(model, "fc1").__class__(
        "fc2:in", "producer", "fc1", "fc2", None, 300, j.path
    )
    j = find_junction(model, "fc1:in")
    assert (j.kind, j.producer, j.consumer, j.num_features) == ("gather", None, "fc1", 784)
    assert j.layer == "fc1:in"


def test_flattened_conv_output_is_a_gather_junction() -> None:
    j = find_junction(LeNet5(), "fc1:in")
    assert (j.kind, j.consumer, j.num_features) == ("gather", "fc1", 800)


def test_nested_module_with_functions_and_batchnorm() -> None:
    j = find_junction(Functional(bn=True), "encoder.0")
    assert (j.producer, j.consumer, j.batchnorm) == ("encoder.0", "head", "bn")
    assert "relu" in " ".join(j.path)
    j = find_junction(Functional(bn=True), "head:in")
    assert j.producer == "encoder.0"


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return self.a(h) + self.b(h)


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class WithSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.softmax(self.fc1(x), -1))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 2)
        self.fc2.weight = self.fc1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


@pytest.mark.parametrize(
    ("model", "target", "message"),
    [
        (TwoHeads(), "fc", "feeds 2 consumers"),
        (WithLayerNorm(), "fc1", "lies norm \\(LayerNorm\\), which mixes features"),
        (WithSoftmax(), "fc1", "lies softmax, which mixes features"),
        (Tied(), "fc1", "weights tied to 'fc2.weight'"),
        (Reused(), "fc", "called 2 times"),
        (LeNet300100(), "fc4", "no nn.Linear named 'fc4'. Did you mean 'fc[123]'"),
        (LeNet300100(), "relu1", "'relu1' is a ReLU, not an nn.Linear"),
        (LeNet5(), "pool1", "'pool1' is a MaxPool2d, not an nn.Linear"),
        (LeNet300100(), "fc3", "could not find the consumer of 'fc3'"),
        (LeNet300100(), "", "non-empty layer name"),
    ],
)
def test_refusals_name_the_problem(model: nn.Module, target: str, message: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(JunctionError, match=message):
        find_junction(model, target)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_valid_names_are_listed() -> None:
    with pytest.raises(JunctionError, match=r"Valid names: \['fc1', 'fc2', 'fc3'\]"):
        find_junction(LeNet300100(), "nope")


def test_explicit_consumer_must_agree() -> None:
    message = "consumer of 'fc1' is 'fc2', not the given consumer 'fc3'"
    with pytest.raises(JunctionError, match=message):
        find_junction(LeNet300100(), "fc1", consumer="fc3")
