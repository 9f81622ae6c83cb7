"""Random problems of CaffeNet's classifier shape, for the benchmarks' parts that need no data.

The inputs are generated on the fly in batches (never kept), so that K can be far larger than
memory would hold as an n × K matrix; the metric is top-1 agreement with the unreduced network.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class RandomBatches:
    """``count`` random inputs (and dummy targets) in batches, generated on the fly (never kept)."""

    def __init__(self, count: int, features: int, batch: int, seed: int, device: torch.device):
        self.count, self.features, self.batch, self.seed, self.device = (
            count,
            features,
            batch,
            seed,
            device,
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        for start in range(0, self.count, self.batch):
            b = min(self.batch, self.count - start)
            x = torch.randn(b, self.features, generator=gen, device=self.device)
            yield x, torch.zeros(b, dtype=torch.long, device=self.device)


def classifier(dims: tuple[int, int, int, int], device: torch.device) -> nn.Sequential:
    """CaffeNet's classifier (fc6, fc7, fc8 with ReLU and dropout), random weights."""
    torch.manual_seed(0)
    d0, d6, d7, d8 = dims
    return (
        nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(d0, d6)),
                    ("relu6", nn.ReLU()),
                    ("drop6", nn.Dropout(0.5)),
                    ("fc7", nn.Linear(d6, d7)),
                    ("relu7", nn.ReLU()),
                    ("drop7", nn.Dropout(0.5)),
                    ("fc8", nn.Linear(d7, d8)),
                ]
            )
        )
        .to(device)
        .eval()
    )


def random_problem(
    dims: tuple[int, int, int, int], device: torch.device, n_eval: int, batch: int, points: int
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], Tensor, list[int]]:
    """A random classifier, held-out inputs labelled by it (the metric is top-1 agreement with
    the unreduced network), one example input, and a ``points``-point grid of fc6's width."""
    model = classifier(dims, device)
    eval_x = list(RandomBatches(n_eval, dims[0], batch, seed=1, device=device))
    with torch.no_grad():
        eval_data = [(x, model(x).argmax(-1)) for x, _ in eval_x]
    return model, eval_data, eval_x[0][0][:1], even_grid(dims[1], points)


def even_grid(n: int, points: int) -> list[int]:
    """At most ``points`` ranks evenly spaced in ``[1, n)``, descending (``n`` itself excluded)."""
    return sorted(
        {max(1, round(v)) for v in torch.linspace(1, n, points + 1)[:-1].tolist()}, reverse=True
    )
