"""The paper's MNIST rows (Zhang, Davoodi & Hu 2018) and the records of our reproduction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: Methods of the comparison, in table order: key -> label.
METHOD_LABELS = {
    "svd_qr": "svd_qr (paper: Alg. 2 + Eq. 6)",
    "qr": "qr (nested pivoted Cholesky) + LS",
    "svd_qr_affine": "svd_qr, affine=True",
    "qr_affine": "qr, affine=True",
    "magnitude": "magnitude, no update",
    "magnitude_ls": "magnitude + LS update",
    "random_ls": "random + LS update (mean of seeds)",
}


#: Ridge values (relative to the mean diagonal of G[S, S]) tried on the paper's kept sets.
RIDGES = (1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's memory table (no retraining, top-1 on MNIST test)."""

    name: str
    arch: str
    target: str
    memory_after: float  # % of the original parameter memory
    memory_ratio: float
    acc_before: float  # %
    acc_after: float  # %

    @property
    def allowed_drop(self) -> float:
        """The paper's own accuracy drop for this row, as a fraction."""
        return (self.acc_before - self.acc_after) / 100.0


PAPER_ROWS = (
    PaperRow("LeNet300-100-FC1", "lenet300100", "net.fc1:in", 18.85, 5.30, 98.21, 96.57),
    PaperRow("LeNet300-100-FC2", "lenet300100", "net.fc2:in", 17.64, 5.67, 98.21, 96.24),
    PaperRow("LeNet300-100-FC3", "lenet300100", "net.fc3:in", 89.40, 1.12, 98.21, 96.92),
    PaperRow("LeNet5-FC1", "lenet5", "net.fc1:in", 8.13, 12.30, 99.10, 97.26),
    PaperRow("LeNet5-FC2", "lenet5", "net.fc2:in", 12.67, 7.88, 99.10, 97.25),
)


ARCH_LABELS = {"lenet300100": "LeNet-300-100", "lenet5": "LeNet-5"}


#: The paper's "Original" energy rows (joules; DESIGN.md section 2) and its two energy ratios.
PAPER_ENERGY: dict[str, dict[str, Any]] = {
    "lenet300100": {
        "mac": 1.22e-6,
        "sram_weights": 1.33e-6,
        "sram_activations": 11.94e-9,
        "dram": 170.51e-6,
        "total": None,
        "ratio": 26.71,
        "ratio_acc": 96.24,
        "ratio_row": "LeNet300-100-FC2",
    },
    "lenet5": {
        "mac": 10.55e-6,
        "sram_weights": 2.15e-6,
        "sram_activations": 49.74e-9,
        "dram": 275.52e-6,
        "total": 288.27e-6,
        "ratio": 33.02,
        "ratio_acc": 97.26,
        "ratio_row": "LeNet5-FC1",
    },
}


ENERGY_PARTS = ("mac", "sram_weights", "sram_activations", "dram", "total")


def smallest_within(acc: dict[int, float], threshold: float) -> int | None:
    """The smallest p whose accuracy is at least ``threshold`` (None if there is none)."""
    ok = [p for p, a in acc.items() if not math.isnan(a) and a >= threshold - 1e-12]
    return min(ok) if ok else None


def algorithm1_stop(acc: dict[int, float], threshold: float) -> int | None:
    """The p where Algorithm 1 stops (going down the grid): the last p before the first failure."""
    last = None
    for p in sorted(acc, reverse=True):
        if acc[p] < threshold - 1e-12:
            break
        last = p
    return last


@dataclass
class RowResult:
    row: PaperRow
    n: int
    rank: int
    layer: str
    base_acc: float
    threshold: float
    grid: list[int]
    curves: dict[str, dict[int, float]]
    random_runs: list[dict[int, float]]
    ridge_curves: dict[float, dict[int, float]]
    energy: dict[int, Any]  # p -> EnergyReport (n -> original)
    kept_svd: dict[int, tuple[int, ...]]
    chosen: int | None
    alg1: int | None
    paper_p: int
    paper_weights: int
    energy_share: dict[float, int] = field(default_factory=dict)  # share of Σσ² -> p needed
    check: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class ArchResult:
    arch: str
    test_acc: float
    train_seconds: float | None
    stats_seconds: float
    samples: int
    rows: list[RowResult]
    model: nn.Module = field(repr=False, default=None)
    stats: dict[str, Any] = field(repr=False, default_factory=dict)


def numerical_rank(stats: Any) -> int:
    """rank(X) by the package's rule, at least 1 (as ``sweep_junction`` starts its grid)."""
    from lightning_neuronprune.core.selection import numerical_rank as rank

    return max(1, rank(stats))


def initial_grid(rank: int, quick: bool) -> list[int]:
    """Every p up to 128 (the paper's points lie there), then a coarse grid up to rank(X)."""
    if quick:
        values = [1, 2, 4, 8, 16, 32, 64, rank]
    else:
        values = list(range(1, 129)) + [144, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768]
        values.append(rank)
    return sorted({v for v in values if 1 <= v <= rank}, reverse=True)
