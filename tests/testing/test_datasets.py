"""Tests of :mod:`lightning_neuronprune.testing.datasets`: the IDX reader on tiny synthetic files
written
here (gzipped or not, every IDX dtype), its errors on bad and truncated files, and MNIST from a
local directory without touching the network. One test reads the real test split when the files
are present (``mnist_dir`` fixture, skipped otherwise).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_neuronprune.testing import datasets
from lightning_neuronprune.testing.datasets import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    MNISTDataModule,
    has_mnist,
    load_mnist,
    read_idx,
)

#: IDX type code -> big-endian numpy dtype (the IDX format stores MSB first).
IDX_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """The IDX encoding of ``array``: magic ``00 00 code ndim``, big-endian int32 dims, data."""
    header = bytes([0, 0, code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(IDX_CODES[code]).tobytes()


def _write(path: Path, payload: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _mnist_like(
    root: Path, rng: np.random.Generator, n_train: int = 7, n_test: int = 3, gz: bool = True
) -> dict[str, np.ndarray]:
    """Write the four MNIST files, with ``n_train``/``n_test`` random images, into ``root``."""
    arrays = {
        ("train", "images"): rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        ("train", "labels"): rng.integers(0, 10, n_train, dtype=np.uint8),
        ("test", "images"): rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        ("test", "labels"): rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    suffix = ".gz" if gz else ""
    for key, array in arrays.items():
        _write(root / (MNIST_FILES[key] + suffix), _idx_bytes(array, 0x08))
    return {f"{split}_{what}": array for (split, what), array in arrays.items()}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the network was touched: urlretrieve{args}")

    monkeypatch.setattr(datasets.urllib.request, "urlretrieve", refuse)


# -------------------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("code", "shape"),
    [(0x08, (5, 3, 2)), (0x09, (4,)), (0x0B, (2, 3)), (0x0C, (3, 1)), (0x0D, (6,)), (0x0E, (2, 2))],
)
def test_read_idx_round_trip(
    tmp_path: Path, rng: np.random.Generator, code: int, shape: tuple[int, ...], suffix: str
) -> None:
    dtype = np.dtype(IDX_CODES[code])
    if dtype.kind == "f":
        array = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    path = _write(tmp_path / f"data{suffix}", _idx_bytes(array, code))
    out = read_idx(path)
    assert out.shape == shape and out.dtype == dtype
    assert np.array_equal(out, array)
    assert np.array_equal(read_idx(str(path)), array)  # str paths too


def test_read_idx_empty_dimension(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty", _idx_bytes(np.zeros((0, 28, 28), np.uint8), 0x08))
    assert read_idx(path).shape == (0, 28, 28)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", r"is not an IDX file \(magic bytes b''\)"),
        (b"\x00\x00", r"is not an IDX file \(magic bytes b'\\x00\\x00'\)"),
        (bytes([1, 0, 8, 1, 0]), r"is not an IDX file \(magic bytes b'\\x01\\x00\\x08\\x01'\)"),
        (b"\x00\x00\x07\x01" + bytes(5), r"is not an IDX file"),  # no type 0x07
        (b"PK\x03\x04zip!", r"is not an IDX file"),
    ],
)  # fmt: skip
def test_read_idx_refuses_a_bad_magic_number(tmp_path: Path, payload: bytes, message: str) -> None:
    path = _write(tmp_path / "bad", payload)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' {message}"):
        read_idx(path)


def _truncated_cases() -> dict[str, tuple[bytes, str]]:
    full = _idx_bytes(np.arange(24, dtype=np.int32).reshape(2, 3, 4), 0x0C)  # 16 + 96 bytes
    return {
        "header": (
            full[:10],
            r"is truncated: its header announces 3 dimensions, 16 bytes of header, but the file "
            r"holds only 10 bytes",
        ),
        "whole values": (
            full[:-8],
            r"holds 88 bytes of data, but its header says \(2, 3, 4\) "
            r"values of >i4: 96 bytes",
        ),
        "part of a value": (full[:-3], r"holds 93 bytes of data, but its header says \(2, 3, 4\)"),
        "trailing bytes": (full + b"\x00", r"holds 97 bytes of data, but its header says"),
    }


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("case", ["header", "whole values", "part of a value", "trailing bytes"])
def test_read_idx_refuses_a_truncated_file(tmp_path: Path, case: str, suffix: str) -> None:
    payload, message = _truncated_cases()[case]
    path = _write(tmp_path / f"cut{suffix}", payload)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' {message}"):
        read_idx(path)


def test_read_idx_refuses_a_truncated_gzip_stream(tmp_path: Path) -> None:
    whole = _write(tmp_path / "whole.gz", _idx_bytes(np.arange(1000, dtype=np.uint8), 0x08))
    path = tmp_path / "cut.gz"
    path.write_bytes(whole.read_bytes()[:-12])  # the stream ends before its end marker
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' is not a valid gzip file"):
        read_idx(path)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=rf"'{re.escape(str(garbage))}' is not a valid gzip file"):
        read_idx(garbage)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


# ------------------------------------------------------------------------------------ load_mnist


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_from_a_local_directory(
    tmp_path: Path, rng: np.random.Generator, gz: bool, no_network: None
) -> None:
    arrays = _mnist_like(tmp_path, rng, gz=gz)
    for split, n in (("train", 7), ("test", 3)):
        x, y = load_mnist(tmp_path, split, normalize=False)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        pixels = torch.from_numpy(arrays[f"{split}_images"].astype(np.float64))
        torch.testing.assert_close(x[:, 0].double(), pixels / 255.0)
        assert y.tolist() == arrays[f"{split}_labels"].tolist()
        xn, yn = load_mnist(str(tmp_path), split)  # normalize=True by default
        torch.testing.assert_close(xn, (x - MNIST_MEAN) / MNIST_STD)
        assert torch.equal(yn, y)


def test_load_mnist_prefers_the_uncompressed_file(
    tmp_path: Path, rng: np.random.Generator, no_network: None
) -> None:
    _mnist_like(tmp_path, rng, gz=True)
    labels = np.array([9, 9, 9], dtype=np.uint8)
    _write(tmp_path / MNIST_FILES[("test", "labels")], _idx_bytes(labels, 0x08))
    assert load_mnist(tmp_path, "test")[1].tolist() == [9, 9, 9]


def test_load_mnist_without_the_files_does_not_download(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(
        FileNotFoundError, match=rf"'t10k-images-idx3-ubyte'.*'{re.escape(str(tmp_path))}'"
    ):
        load_mnist(tmp_path, "test")
    assert list(tmp_path.iterdir()) == []  # nothing written either
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist(missing, "train")
    assert not missing.exists()


@pytest.mark.parametrize("gz", [True, False])
def test_has_mnist_needs_all_four_files_plain_or_gzipped(
    tmp_path: Path, rng: np.random.Generator, gz: bool
) -> None:
    assert not has_mnist(tmp_path) and not has_mnist(tmp_path / "nowhere")
    _mnist_like(tmp_path, rng, gz=gz)
    assert has_mnist(tmp_path) and has_mnist(str(tmp_path))
    stem = MNIST_FILES[("test", "labels")]
    (tmp_path / (stem + ".gz" if gz else stem)).unlink()
    assert not has_mnist(tmp_path)


def test_load_mnist_refuses_an_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`split` must be 'train' or 'test', got 'val'"):
        load_mnist(tmp_path, "val")


def test_download_fetches_only_the_missing_files_into_root(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "mirror"
    source.mkdir()
    _mnist_like(source, rng)
    root = tmp_path / "data" / "mnist"  # created on demand
    fetched: list[str] = []

    def fake_urlretrieve(url: str, target: Path) -> None:  # stands in for the network
        assert url.startswith(datasets.MNIST_URL)
        name = url.removeprefix(datasets.MNIST_URL)
        fetched.append(name)
        Path(target).write_bytes((source / name).read_bytes())

    monkeypatch.setattr(datasets.urllib.request, "urlretrieve", fake_urlretrieve)
    x, y = load_mnist(root, "test", download=True)
    assert x.shape == (3, 1, 28, 28) and fetched == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    load_mnist(root, "test", download=True)  # already there: nothing fetched again
    assert len(fetched) == 2


# -------------------------------------------------------------------------------- MNISTDataModule


def test_datamodule_splits_a_local_directory(
    tmp_path: Path, rng: np.random.Generator, no_network: None
) -> None:
    arrays = _mnist_like(tmp_path, rng, n_train=9, n_test=4)
    dm = MNISTDataModule(str(tmp_path), batch_size=2, val_size=3, limit_train=4)
    dm.prepare_data()  # download=False: touches nothing
    dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.val_set) == 3 and len(dm.test_set) == 4
    # validation holds the last training images, the training set the first ones
    val_labels = dm.val_set.tensors[1].tolist()
    assert val_labels == arrays["train_labels"][-3:].tolist()
    assert dm.train_set.tensors[1].tolist() == arrays["train_labels"][:4].tolist()
    batches = list(dm.train_dataloader())
    assert [len(b[0]) for b in batches] == [2, 2]
    assert [len(b[0]) for b in dm.val_dataloader()] == [3]
    assert [len(b[0]) for b in dm.test_dataloader()] == [4]
    dm = MNISTDataModule(str(tmp_path), val_size=3)  # no limit: every image before validation
    dm.setup()
    assert len(dm.train_set) == 6


def test_real_mnist_test_split(mnist_dir: Path) -> None:
    x, y = load_mnist(mnist_dir, "test", normalize=False)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert x.min().item() >= 0.0 and x.max().item() <= 1.0
    assert torch.equal(torch.bincount(y, minlength=10).sum(), torch.tensor(10000))
    assert set(y.unique().tolist()) == set(range(10))
