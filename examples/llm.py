"""Remove FFN neurons from a pretrained Llama-family decoder under a perplexity budget.

The model is SmolLM2-135M (30 decoder layers, SwiGLU FFNs 576 → 1536 → 576) and the text is Jane
Austen's, both read offline by ``benchmarks/llm_data.py`` (its docstring gives the install
commands). The model is wrapped in a LightningModule that takes Hugging Face causal-LM dict batches
(``input_ids``, ``attention_mask``, ``labels``). The fit only calibrates: one epoch of a single
training batch whose ``training_step`` does nothing (no optimizer, no gradient), so the weights
are the pretrained ones when the callback runs at the end of the fit.

``NeuronEliminationCallback(targets="auto")`` then finds the gated FFN of every layer, collects
the statistics of ``down_proj``'s input on the calibration windows (the start of *Pride and
Prejudice*), and the allocation search (``JointSettings(strategy="allocate")``) picks per-layer
widths, ordered by each layer's second-order loss increase (its ``down_proj`` output weighted by
the diagonal Fisher information from one backward pass over 4,096 calibration tokens), within the
perplexity budget (``CausalLMPerplexity``, ``--budget``, default 5 %) measured on the evaluation
windows (the start of *Emma*). The held-out perplexity is measured on a third novel (the start of
*Persuasion*) before and after. Evaluating on a novel that the statistics did not come from
prices in what the re-fit learnt of the calibration text alone.

The selection is ``FitOptions(method="qr")`` by default (``--method output`` for the package's
default): on this model ``qr`` held out as well as ``output`` at the same widths in
``benchmarks/bench_llm.py`` and skips the output-aware ordering, minutes per run on a CPU.

The held-out confirmation is off (``confirm=None``): with a few thousand evaluation tokens there
are only a handful of windows, too few to split in two and to bound a held-out drop (its standard
error is estimated over chunks of 100 samples). The held-out novel is reported instead.

Run from the repository root::

    python examples/llm.py                                  # 16384 + 2048 + 4096 tokens
    python examples/llm.py --budget 10% --max-evaluations 12
    python examples/llm.py --tiny                           # random tiny Llama, no weights needed

``--tiny`` builds a two-layer random-init ``LlamaConfig`` model and synthetic tokens, so the
example runs anywhere; its perplexities mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from llm_data import MissingDataError, load_model, token_windows

from lightning_neuronprune import (
    CausalLMPerplexity,
    DataOptions,
    FitOptions,
    JointSettings,
    NeuronEliminationCallback,
)

CALIBRATION_BOOK = "prideprejudice"
EVALUATION_BOOK = "emma"
HELD_OUT_BOOK = "persuasion"


class Windows(Dataset):
    """Token windows (W, T) as causal-LM dict samples; no padding, so the mask is all ones."""

    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class LitCausalLM(pl.LightningModule):
    """A Hugging Face causal LM whose ``forward`` takes the batch's keywords and returns logits.

    ``training_step`` does nothing and there is no optimizer: the fit only calibrates.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        return None  # no loss: nothing is trained

    def configure_optimizers(self) -> None:
        return None


def tiny_model_and_windows(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Tensor]]:
    """A two-layer random-init Llama and synthetic tokens from a fixed random bigram chain."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    vocab = 128
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    successors = torch.randint(vocab, (vocab, 4))  # each token has 4 likely successors

    def text(tokens: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        windows = tokens // args.seq_len
        ids = torch.empty(windows * args.seq_len, dtype=torch.long)
        ids[0] = 0
        choice = torch.randint(4, (len(ids),), generator=g)
        for t in range(1, len(ids)):
            ids[t] = successors[ids[t - 1], choice[t]]
        return ids.view(windows, args.seq_len)

    return model, {
        "calibration": text(args.calib_tokens, 1),
        "evaluation": text(args.eval_tokens, 2),
        "held_out": text(args.held_out_tokens, 3),
    }


def pretrained_model_and_windows(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Tensor]]:
    """SmolLM2-135M and windows of three of Austen's novels: calibration, evaluation and
    held-out text each from its own."""
    model, tok = load_model()
    return model, {
        "calibration": token_windows(tok, CALIBRATION_BOOK, args.calib_tokens, args.seq_len),
        "evaluation": token_windows(tok, EVALUATION_BOOK, args.eval_tokens, args.seq_len),
        "held_out": token_windows(tok, HELD_OUT_BOOK, args.held_out_tokens, args.seq_len),
    }


@torch.inference_mode()
def perplexity(module: LitCausalLM, loader: DataLoader) -> float:
    """``CausalLMPerplexity`` of ``module`` over ``loader``."""
    module.eval()
    metric = CausalLMPerplexity()
    for batch in loader:
        metric.update(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    return float(metric.compute())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--budget", default="5%", help='perplexity rise: "N%%" or a number')
    parser.add_argument("--calib-tokens", type=int, default=16384, help="statistics tokens")
    parser.add_argument(
        "--eval-tokens", type=int, default=2048, help="tokens the search evaluates on"
    )
    parser.add_argument(
        "--held-out-tokens", type=int, default=4096, help="tokens of the held-out novel"
    )
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    parser.add_argument(
        "--max-evaluations", type=int, default=8, help="full evaluations of the search"
    )
    parser.add_argument(
        "--method", choices=["output", "qr"], default="qr", help="FitOptions(method=...)"
    )
    parser.add_argument(
        "--probe-samples", type=int, default=1, help="windows the junction probe runs on"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard root directory")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama, synthetic tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    for name in ("calib_tokens", "eval_tokens", "held_out_tokens"):
        if getattr(args, name) < args.seq_len:
            parser.error(f"--{name.replace('_', '-')} must be at least --seq-len")
    budget: Any = args.budget
    if not budget.endswith("%"):
        try:
            budget = float(budget)
        except ValueError:
            parser.error(f'--budget must be "N%" or a number, got {args.budget!r}')
    args.budget = budget
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed)
    try:
        model, windows = (
            tiny_model_and_windows(args) if args.tiny else pretrained_model_and_windows(args)
        )
    except MissingDataError as err:
        print(f"error: {err}\n(or run with --tiny)", file=sys.stderr)
        return 2
    module = LitCausalLM(model)
    loaders = {
        part: DataLoader(Windows(w), batch_size=args.batch_size) for part, w in windows.items()
    }
    layers = model.model.layers
    widths_before = [layer.mlp.down_proj.in_features for layer in layers]
    print(
        f"{len(layers)} decoder layers, FFN width {widths_before[0]}; windows of {args.seq_len} "
        f"tokens: {len(windows['calibration'])} calibration, {len(windows['evaluation'])} "
        f"evaluation, {len(windows['held_out'])} held-out"
    )
    ppl_before = perplexity(module, loaders["held_out"])
    print(f"held-out perplexity before: {ppl_before:.3f}")

    pruner = NeuronEliminationCallback(
        targets="auto",
        max_degradation=args.budget,
        metric=CausalLMPerplexity(),
        fit=FitOptions(method=args.method),
        joint=JointSettings(strategy="allocate", max_evaluations=args.max_evaluations),
        confirm=None,  # a handful of evaluation windows: too few to split (see the docstring)
        max_samples=len(windows["calibration"]),
        eval_dataloader=loaders["evaluation"],
        example_input=windows["evaluation"][:1],  # one window of ids for the energy model
        data=DataOptions(probe_samples=args.probe_samples),
        verbose=args.verbose,
    )
    logger = TensorBoardLogger(args.log_dir, name="llm_tiny" if args.tiny else "llm")
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,  # calibration only: one batch, and the step does nothing
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[pruner],
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    fit_started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loaders["calibration"])
    fit_seconds = time.perf_counter() - fit_started

    ppl_after = perplexity(module, loaders["held_out"])
    widths = [layer.mlp.down_proj.in_features for layer in layers]
    result = pruner.result
    assert result is not None  # the fit finished, so the callback ran
    print("\n=== FFN reduction " + "=" * 50)
    print(f"budget: perplexity may rise by {result.budget:.3f} on the evaluation windows")
    print(f"FFN width per layer ({widths_before[0]} before): {widths}")
    kept, total = sum(widths), sum(widths_before)
    print(f"FFN neurons removed: {total - kept} of {total} ({(total - kept) / total:.1%})")
    chosen = result.decision.chosen
    if chosen is not None and result.applied:
        print(
            f"evaluation perplexity {chosen.accuracy - chosen.accuracy_drop:.3f} before, "
            f"{chosen.accuracy:.3f} after (rise {chosen.accuracy_drop:+.3f}); "
            f"modelled energy ratio {chosen.energy_ratio:.3f}x, parameter memory "
            f"{chosen.memory_ratio:.3f}x lower"
        )
    else:
        print("no configuration was applied: the model is unchanged")
    print(
        f"held-out perplexity: {ppl_before:.3f} before, {ppl_after:.3f} after "
        f"({ppl_after / ppl_before - 1:+.2%})"
    )
    print(
        f"wall time {time.perf_counter() - started:.0f}s (fit and reduction {fit_seconds:.0f}s, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''})"
    )
    print(f"TensorBoard: tensorboard --logdir {args.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
