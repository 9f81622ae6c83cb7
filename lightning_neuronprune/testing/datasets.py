"""MNIST from a directory of the original IDX files, for examples, tests and benchmarks.

No network is touched unless ``download=True`` is passed explicitly.
"""

from __future__ import annotations

import gzip
import math
import os
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MNIST_FILES", "MNISTDataModule", "has_mnist", "load_mnist", "read_idx"]

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
#: Mean and standard deviation of the MNIST training pixels in [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array.

    Raises:
        ValueError: the file is not a valid IDX file: a bad magic number, a truncated header,
            data that do not fill the shape of its header exactly, or a broken gzip stream.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{str(path)!r} is not a valid gzip file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (magic bytes {data[:4]!r})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(
            f"{str(path)!r} is truncated: its header announces {ndim} dimensions, {offset} bytes "
            f"of header, but the file holds only {len(data)} bytes"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{str(path)!r} holds {len(data) - offset} bytes of data, but its header says "
            f"{shape} values of {dtype.str}: {expected} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def has_mnist(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds the four MNIST IDX files (each plain or ``.gz``)."""
    return all(_local(Path(root), stem) is not None for stem in MNIST_FILES.values())


def _local(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _find(root: Path, stem: str, download: bool) -> Path:
    found = _local(root, stem)
    if found is not None:
        return found
    if not download:
        raise FileNotFoundError(
            f"MNIST file {stem!r} (or {stem}.gz) not found in {str(root)!r}; pass a directory "
            "holding the four IDX files, or download=True on a machine with internet"
        )
    root.mkdir(parents=True, exist_ok=True)
    target = root / (stem + ".gz")
    urllib.request.urlretrieve(MNIST_URL + stem + ".gz", target)  # a fixed https URL
    return target


def load_mnist(
    root: str | os.PathLike[str],
    split: str = "train",
    *,
    normalize: bool = True,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load an MNIST split as tensors.

    Args:
        root: directory of the IDX files (``train-images-idx3-ubyte[.gz]`` ...).
        split: ``"train"`` (60000 images) or ``"test"`` (10000).
        normalize: scale to [0, 1] and standardise with the training mean and std.
        download: fetch missing files from the public mirror into ``root``.

    Returns:
        ``(images, labels)``: float32 (N, 1, 28, 28) and int64 (N,).
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, MNIST_FILES[(split, "images")], download))
    labels = read_idx(_find(root, MNIST_FILES[(split, "labels")], download))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))


class MNISTDataModule(pl.LightningDataModule):
    """MNIST from a local directory: the 60k training images split into train/val, and the test set.

    Args:
        data_dir: directory of the four IDX files.
        batch_size: batch size of every loader.
        val_size: training images held out for validation (the last ones).
        limit_train: use only the first ``limit_train`` training images (for quick runs).
        download: fetch missing files (needs internet).
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        val_size: int = 5000,
        limit_train: int | None = None,
        download: bool = False,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.limit_train = limit_train
        self.download = download

    def prepare_data(self) -> None:
        if self.download:
            for split in ("train", "test"):
                load_mnist(self.data_dir, split, download=True)

    def setup(self, stage: str | None = None) -> None:
        x, y = load_mnist(self.data_dir, "train")
        train_end = len(x) - self.val_size
        n_train = train_end if self.limit_train is None else min(self.limit_train, train_end)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[train_end:], y[train_end:])
        self.test_set = TensorDataset(*load_mnist(self.data_dir, "test"))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000)
