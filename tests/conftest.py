from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

#: Where the MNIST IDX files are looked for: $NEURONPRUNE_MNIST_DIR, else ../shared/data/mnist.
MNIST_DIR = Path(
    os.environ.get(
        "NEURONPRUNE_MNIST_DIR", Path(__file__).resolve().parents[1].parent / "shared/data/mnist"
    )
)


def pytest_configure(config: pytest.Config) -> None:
    """One torch/BLAS thread for the suite and the scripts it runs. Its tensors are small, so a
    second thread only adds overhead; and on a shared 2-core machine whose other core is busy,
    torch's two-thread pool is pathologically slow: test_mnist_lenet300100_fc1_to_60_neurons took
    16.8 s with one thread and 171 s with two while a benchmark ran on the other core."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the example and benchmark runs


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rng() -> np.random.Generator:
    """Seeded numpy generator, for matrices checked against LAPACK (scipy)."""
    return np.random.default_rng(20180605)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if (
        not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
        and not (MNIST_DIR / "train-images-idx3-ubyte").exists()
    ):
        pytest.skip(
            f"MNIST IDX files not found in {MNIST_DIR}; set NEURONPRUNE_MNIST_DIR to a directory "
            "holding them"
        )
    return MNIST_DIR


@pytest.fixture(params=["host", "device"])
def pivots_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with pivots read on the host (the CPU path) and kept on the device (the
    synchronisation-free GPU path, forced on the CPU)."""
    import lightning_neuronprune.core.cholesky as cholesky

    monkeypatch.setattr(cholesky, "_FORCE_DEVICE_PIVOTS", request.param == "device")
    return request.param


class HostReads:
    """Counts the tensor methods that read a value on the host (a device synchronisation on a
    GPU): ``item``, ``tolist``, ``nonzero``, ``cpu``, ``numpy`` and ``bool``/``int``/``float``
    of a tensor. On the CPU nothing waits, so a test compares counts instead: a loop without a
    synchronisation per batch makes as many reads for 2 batches as for 6."""

    METHODS = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.counts: Counter[str] = Counter()  # by method name
        for name in self.METHODS:
            monkeypatch.setattr(
                torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name))
            )
        monkeypatch.setattr(torch, "nonzero", self._counted("nonzero", torch.nonzero))

    def _counted(self, name, method):
        def counted(*args, **kwargs):
            self.count += 1
            self.counts[name] += 1
            return method(*args, **kwargs)

        return counted


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> HostReads:
    """A :class:`HostReads` counter, for the rest of the test."""
    return HostReads(monkeypatch)
