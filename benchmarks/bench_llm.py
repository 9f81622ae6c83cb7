"""FFN neuron removal on a real pretrained Llama-family decoder: our refits against the baselines.

The model is SmolLM2-135M-Instruct (30 decoder layers, SwiGLU FFNs 576 → 1536 → 576) and the text
is Jane Austen's (see ``llm_data.py`` for both, offline). Every method removes the same fraction of
the FFN neurons of **every** layer (uniform widths), from the same calibration tokens (windows of
*Pride and Prejudice*), and is scored by perplexity on the same held-out text (the first windows of
*Persuasion*), relative to the unreduced model. ``h`` is ``down_proj``'s input,
``act(gate_proj(x)) * up_proj(x)``; neuron ``j`` is row ``j`` of ``gate_proj`` and ``up_proj`` and
column ``j`` of ``down_proj``.

Methods:

* ``magnitude``: keep the largest ``‖W_down[:, j]‖`` (data-free, no refit).
* ``wanda``: Wanda-sp, keep the largest ``‖W_down[:, j]‖·√E[h_j²]``, no refit.
* ``flap``: FLAP's fluctuation score ``Var(h_j)·‖W_down[:, j]‖²``, and the bias compensation
  ``W_down[:, dropped] · E[h_dropped]`` folded into a new ``down_proj`` bias.
* ``qr``, ``output``: the package's gated-junction reduction (``reduce_junction``: nested pivoted
  Cholesky or output-aware selection, then the least-squares refit of ``down_proj`` on its input
  statistics ``G``), one-shot, statistics from the original model. The selection order is nested,
  so each layer's order is computed once and ``order[:p]`` is the choice at every ratio.
* ``seq``: ``qr`` layer by layer; layer l's statistics are collected on the model already
  reduced in layers < l (one layer's ``G`` in memory at a time).
* ``ridge``: ``qr`` with a ridge in the refit (``--ridge``, relative to the mean diagonal of
  ``G[S, S]``).
* ``alloc``: ``qr`` at per-layer widths, as the callback's ``allocate`` strategy orders them: the
  loss proxy ``½ Σ_k F_kk (W R_S Wᵀ)_kk`` of every layer and width (multiples of 32), with the
  diagonal Fisher ``F`` of each ``down_proj`` output from one backward pass over the first
  ``--fisher-tokens`` calibration tokens; the path lowers, one step at a time, the layer whose
  proxy grows least per neuron removed, and each ratio takes the first configuration that
  removes that share of all FFN neurons (so ``p / n`` is a mean).
* ``alloc-energy``: the same path ordered by the ``energy`` proxy instead (the share of each
  layer's own ``down_proj`` output energy left unexplained; no gradient).

Seconds per row: the statistics pass (a forward over the calibration tokens, plus the n×n Gram
matrices for ours; Wanda and FLAP need only per-neuron moments, so theirs is the forward alone),
the selection orders, and the refit and surgery at that ratio. The held-out evaluation is not
counted. The throughput part times full forward passes (with logits) of the unreduced model, the
20%-reduced one and the same widths rounded to a multiple of 64, interleaved, best of a few.

By default, 16,384 calibration and 4,096 held-out tokens; magnitude, Wanda-sp, FLAP and ``qr``
at 10, 20 and 30%; ``seq``, ``ridge`` and ``output`` at 20% only (``--seq-ratios`` and so on);
about 22 minutes on a shared 2-core CPU with one thread, of which 7 are ``output``'s ordering.

    python benchmarks/bench_llm.py --quick           # 2k + 2k tokens, 20% only: about 5 minutes
    python benchmarks/bench_llm.py
    python benchmarks/bench_llm.py --methods seq,ridge --seq-ratios 0.1,0.3 --ridge 1e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_data import MissingDataError, load_model, token_windows
from report import machine_description, md_table

from lightning_neuronprune import (
    CausalLMPerplexity,
    FitOptions,
    JunctionStatistics,
    find_junction,
    nested_order,
    reduce_junction,
)
from lightning_neuronprune.core.fitting import JunctionFitter
from lightning_neuronprune.core.selection import output_order
from lightning_neuronprune.search.allocation import allocation_path, proxy_curve
from lightning_neuronprune.search.sensitivity import default_loss, output_sensitivity

METHODS = ("magnitude", "wanda", "flap", "qr", "alloc", "alloc-energy", "output", "seq", "ridge")
CALIBRATION_BOOK = "prideprejudice"
HELD_OUT_BOOK = "persuasion"


# ------------------------------------------------------------------------------- model plumbing


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face Llama-family causal LM."""
    return model.model.layers


def gated_junctions(model: nn.Module) -> list:
    """The gated FFN junction of every layer (``gate_proj``, ``up_proj`` → ``down_proj``), found
    by the package's tracing."""
    return [
        find_junction(model, f"model.layers.{i}.mlp.gate_proj")
        for i in range(len(decoder_layers(model)))
    ]


def slice_ffn(mlp: nn.Module, kept: Tensor, bias: Tensor | None = None) -> None:
    """Keep the neurons ``kept`` of a SwiGLU ``mlp`` without any refit: rows of ``gate_proj``
    and ``up_proj``, columns of ``down_proj``; ``bias`` (d,) becomes ``down_proj``'s bias."""
    kept = torch.sort(kept).values
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, kept.numel(), bias=old.bias is not None)
        new = new.to(old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[kept])
            if old.bias is not None:
                new.bias.copy_(old.bias[kept])
        setattr(mlp, name, new)
    old = mlp.down_proj
    has_bias = old.bias is not None or bias is not None
    new = nn.Linear(kept.numel(), old.out_features, bias=has_bias).to(old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, kept])
        if has_bias:
            b = torch.zeros(old.out_features, dtype=old.weight.dtype)
            if old.bias is not None:
                b += old.bias
            if bias is not None:
                b += bias.to(b.dtype)
            new.bias.copy_(b)
    mlp.down_proj = new
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = kept.numel()


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def layerwise_pass(
    model: nn.Module,
    windows: Tensor,
    batch: int,
    on_layer: Callable[[int, list[Tensor], list[Tensor]], list[Tensor] | None],
) -> None:
    """Run the decoder trunk one layer at a time over ``windows`` (W, T) token ids.

    For each layer l, ``on_layer(l, xs, ys)`` gets ``down_proj``'s inputs ``xs`` and outputs
    ``ys`` (one tensor per batch) and may reduce layer l in place; it returns the new
    ``down_proj`` outputs for the same inputs (or ``None`` if layer l is unchanged). The next
    layer's input is then corrected by (new - old) ``down_proj`` output, so that every layer sees
    the network reduced upstream, at the cost of one forward pass in all. Causal attention
    without padding (``attention_mask=None``) as in the whole model.
    """
    trunk = model.model
    with torch.inference_mode():
        hidden = [trunk.embed_tokens(w) for w in windows.split(batch)]
        positions = torch.arange(windows.shape[1]).unsqueeze(0)
        rope = [trunk.rotary_emb(h, positions) for h in hidden]
    for l, layer in enumerate(decoder_layers(model)):
        xs: list[Tensor] = []
        ys: list[Tensor] = []

        def hook(module, args, output, xs=xs, ys=ys):
            xs.append(args[0].detach())
            ys.append(output.detach())

        handle = layer.mlp.down_proj.register_forward_hook(hook)
        try:
            with torch.inference_mode():
                outs = [
                    _layer_output(layer(h, attention_mask=None, position_embeddings=pe))
                    for h, pe in zip(hidden, rope, strict=True)
                ]
        finally:
            handle.remove()
        new = on_layer(l, xs, ys)
        if new is not None:
            outs = [o - y + n for o, y, n in zip(outs, ys, new, strict=True)]
        hidden = outs


def trunk_hidden(model: nn.Module, windows: Tensor) -> Tensor:
    """The last decoder layer's output (before the final norm), for checks."""
    out: list[Tensor] = []

    def keep(l, xs, ys):
        return None

    layers = decoder_layers(model)
    handle = layers[-1].register_forward_hook(lambda m, a, o: out.append(_layer_output(o)))
    try:
        layerwise_pass(model, windows, windows.shape[0], keep)
    finally:
        handle.remove()
    return out[-1]


# ----------------------------------------------------------------------------------- statistics


@dataclass
class FFNStatistics:
    """Per-layer statistics of ``down_proj``'s input h over the calibration tokens."""

    gram: list[JunctionStatistics] = field(default_factory=list)
    forward_s: float = 0.0  # the pass without the Gram updates
    gram_s: float = 0.0  # the Gram updates alone

    def mean(self, l: int) -> Tensor:
        return self.gram[l].mean().float()

    def second_moment_diag(self, l: int) -> Tensor:
        return self.gram[l].second_moment().diagonal().float()

    def variance(self, l: int) -> Tensor:
        m = self.gram[l].mean()
        return (self.gram[l].second_moment().diagonal() - m * m).clamp_min(0).float()


def update_stats(stats: JunctionStatistics, xs: Sequence[Tensor]) -> float:
    """Add ``down_proj`` inputs to ``stats``; the seconds it took."""
    t0 = time.perf_counter()
    for x in xs:
        stats.update(x.reshape(-1, x.shape[-1]))
    return time.perf_counter() - t0


def collect_ffn_statistics(model: nn.Module, windows: Tensor, batch: int) -> FFNStatistics:
    """The Gram statistics of every layer's ``down_proj`` input on the original model."""
    result = FFNStatistics()

    def on_layer(l, xs, ys):
        s = JunctionStatistics.zeros(xs[0].shape[-1])
        result.gram_s += update_stats(s, xs)
        result.gram.append(s)
        return None

    t0 = time.perf_counter()
    layerwise_pass(model, windows, batch, on_layer)
    result.forward_s = time.perf_counter() - t0 - result.gram_s
    return result


# ------------------------------------------------------------------------------------ baselines


def magnitude_scores(mlp: nn.Module) -> Tensor:
    """``‖W_down[:, j]‖``."""
    return mlp.down_proj.weight.detach().float().norm(dim=0)


def wanda_scores(mlp: nn.Module, second_moment: Tensor) -> Tensor:
    """Wanda-sp: ``‖W_down[:, j]‖ · √E[h_j²]``."""
    return magnitude_scores(mlp) * second_moment.clamp_min(0).sqrt()


def flap_scores(mlp: nn.Module, variance: Tensor) -> Tensor:
    """FLAP's fluctuation: ``Var(h_j) · ‖W_down[:, j]‖²``."""
    return variance * magnitude_scores(mlp) ** 2


def flap_bias(mlp: nn.Module, kept: Tensor, mean: Tensor) -> Tensor:
    """FLAP's bias compensation ``W_down[:, dropped] · E[h_dropped]`` (d,)."""
    dropped = torch.ones(mean.numel(), dtype=torch.bool)
    dropped[kept] = False
    W = mlp.down_proj.weight.detach().float()
    return W[:, dropped] @ mean[dropped]


def top(scores: Tensor, p: int) -> Tensor:
    return torch.topk(scores, p).indices


def reduce_baseline(
    model: nn.Module, method: str, p: int, stats: FFNStatistics | None
) -> nn.Module:
    """A copy of ``model`` with every FFN cut to ``p`` neurons by a no-refit baseline."""
    reduced = copy.deepcopy(model)
    for l, layer in enumerate(decoder_layers(reduced)):
        mlp = layer.mlp
        bias = None
        if method == "magnitude":
            kept = top(magnitude_scores(mlp), p)
        elif method == "wanda":
            kept = top(wanda_scores(mlp, stats.second_moment_diag(l)), p)
        elif method == "flap":
            kept = top(flap_scores(mlp, stats.variance(l)), p)
            bias = flap_bias(mlp, kept, stats.mean(l))
        else:
            raise ValueError(method)
        slice_ffn(mlp, kept, bias)
    return reduced


# ------------------------------------------------------------------------------------------ ours


def reduce_ours(
    model: nn.Module,
    junctions: Sequence,
    stats: FFNStatistics,
    orders: Sequence[Tensor],
    p: int,
    ridge: float = 0.0,
) -> nn.Module:
    """A copy of ``model``, every junction reduced by ``reduce_junction`` to ``order[:p]`` with
    the least-squares refit of ``down_proj``."""
    reduced = copy.deepcopy(model)
    for j, s, order in zip(junctions, stats.gram, orders, strict=True):
        reduce_junction(reduced, j, s, p, kept=order[:p], ridge=ridge)
    return reduced


def loss_allocation(
    model: nn.Module,
    junctions: Sequence,
    stats: FFNStatistics,
    windows: Tensor,
    batch: int,
    fisher_tokens: int | None,
    step: int = 32,
) -> list[dict[str, int]]:
    """The allocate strategy's path of per-layer widths (multiples of ``step``), ordered by the
    loss proxy with the diagonal Fisher of each ``down_proj`` output on ``fisher_tokens``
    calibration tokens (``None``: by the energy proxy)."""
    batches = [{"input_ids": w, "labels": w} for w in windows.split(batch)]
    consumers = [j.consumer for j in junctions]
    fisher: dict[str, Tensor] = {}
    if fisher_tokens is not None:
        loss = default_loss(CausalLMPerplexity())
        fisher = output_sensitivity(model, consumers, batches, loss, max_rows=fisher_tokens)
    widths, curves = {}, {}
    for j, s in zip(junctions, stats.gram, strict=True):
        n = j.num_features
        widths[j.layer] = [n, *range(((n - 1) // step) * step, 0, -step)]
        W = model.get_submodule(j.consumer).weight
        fitter = JunctionFitter(s, W, None, FitOptions(method="qr"))
        curves[j.layer] = proxy_curve(fitter, widths[j.layer], fisher.get(j.consumer))
    return allocation_path(widths, curves, {j.layer: 1 for j in junctions})


def first_removing(path: Sequence[dict[str, int]], n: int, ratio: float) -> dict[str, int]:
    """The first configuration of ``path`` that removes at least ``ratio`` of all neurons."""
    total = n * len(path[0])
    return next(c for c in path if sum(n - p for p in c.values()) >= ratio * total - 1e-9)


def reduce_allocated(
    model: nn.Module, junctions: Sequence, stats: FFNStatistics, orders: Sequence[Tensor],
    config: dict[str, int],
) -> nn.Module:  # fmt: skip
    """A copy of ``model``, each junction reduced to its own width by ``qr`` and the refit."""
    reduced = copy.deepcopy(model)
    for j, s, order in zip(junctions, stats.gram, orders, strict=True):
        p = config[j.layer]
        if p < j.num_features:
            reduce_junction(reduced, j, s, p, kept=order[:p])
    return reduced


def reduce_sequential(
    model: nn.Module, junctions: Sequence, windows: Tensor, batch: int, p: int, ridge: float = 0.0
) -> tuple[nn.Module, float]:
    """A copy of ``model`` reduced layer by layer (``qr``), each layer's statistics collected on
    the model reduced upstream. Returns the model and the seconds of the Gram updates."""
    reduced = copy.deepcopy(model)
    gram_s = 0.0

    def on_layer(l, xs, ys):
        nonlocal gram_s
        s = JunctionStatistics.zeros(xs[0].shape[-1])
        gram_s += update_stats(s, xs)
        order = nested_order(s)
        record = reduce_junction(reduced, junctions[l], s, p, kept=order[:p], ridge=ridge)
        down = reduced.get_submodule(junctions[l].consumer)
        kept = torch.tensor(record.kept)
        with torch.inference_mode():
            return [down(x.index_select(-1, kept)) for x in xs]

    layerwise_pass(reduced, windows, batch, on_layer)
    return reduced, gram_s


# ---------------------------------------------------------------------------------- evaluation


def perplexity(model: nn.Module, windows: Tensor, batch: int) -> float:
    """exp(mean next-token loss) over the windows, each scored from its own start."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows.split(batch):
            logits = model(input_ids=w).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += w[:, 1:].numel()
    return math.exp(total / count)


def throughput(
    models: dict[str, nn.Module], batches: Sequence[int], length: int, repeats: int
) -> dict[tuple[str, int], float]:
    """Tokens per second of full forward passes (with logits), the models interleaved, best of
    ``repeats`` (the machine is shared: the best run is the least disturbed)."""
    best: dict[tuple[str, int], float] = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(3, 40000, (b, length), generator=g)
            for m in models.values():  # warm-up
                m(input_ids=ids)
            for _ in range(repeats):
                for name, m in models.items():
                    t0 = time.perf_counter()
                    m(input_ids=ids)
                    dt = time.perf_counter() - t0
                    best[name, b] = max(best.get((name, b), 0.0), b * length / dt)
    return best


# ------------------------------------------------------------------------------------------ main


@dataclass
class Row:
    method: str
    ratio: float
    p: int
    ppl: float
    seconds: float


def keep_count(n: int, ratio: float) -> int:
    return n - round(ratio * n)


def parse_list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2k + 2k tokens, 20%% only, no ridge")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    ap.add_argument("--ratios", default="0.1,0.2,0.3", help="fractions of FFN neurons removed")
    ap.add_argument("--methods", default="magnitude,wanda,flap,qr,alloc,seq,ridge,output")
    ap.add_argument("--seq-ratios", default="0.2", help="ratios at which `seq` runs")
    ap.add_argument("--ridge-ratios", default="0.2", help="ratios at which `ridge` runs")
    ap.add_argument("--output-ratios", default="0.2", help="ratios at which `output` runs")
    ap.add_argument("--ridge", type=float, default=1e-2, help="relative ridge of `ridge`")
    ap.add_argument("--fisher-tokens", type=int, default=4096, help="`alloc`'s backward pass")
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tp-length", type=int, default=32, help="tokens per sequence (throughput)")
    ap.add_argument("--tp-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_tokens, args.eval_tokens, args.ratios = 2048, 2048, "0.2"
        args.methods = args.methods.replace(",ridge", "").replace(",output", "")
        args.throughput = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratios = parse_list(args.ratios)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    only = {
        "seq": parse_list(args.seq_ratios),
        "ridge": parse_list(args.ridge_ratios),
        "output": parse_list(args.output_ratios),
    }

    t0 = time.perf_counter()
    try:
        model, tok = load_model()
        calib = token_windows(tok, CALIBRATION_BOOK, args.calib_tokens, args.seq_len)
        held = token_windows(tok, HELD_OUT_BOOK, args.eval_tokens, args.seq_len)
    except MissingDataError as e:
        sys.exit(f"bench_llm.py: {e}")
    n = model.config.intermediate_size
    L = len(decoder_layers(model))
    print(f"# {machine_description()}", flush=True)
    print(
        f"# model loaded in {time.perf_counter() - t0:.0f} s: {L} layers, FFN width {n}; "
        f"calibration {calib.numel()} tokens of {CALIBRATION_BOOK} ({calib.shape[0]}×"
        f"{args.seq_len}), held-out {held.numel()} tokens of {HELD_OUT_BOOK}",
        flush=True,
    )

    t = time.perf_counter()
    base = perplexity(model, held, args.batch)
    eval_s = time.perf_counter() - t
    print(
        f"# unreduced: held-out perplexity {base:.3f} ({eval_s:.0f} s per evaluation)", flush=True
    )

    junctions = gated_junctions(model)
    assert all(j.kind == "gated" for j in junctions), junctions

    stats = None
    if set(methods) & {"wanda", "flap", "qr", "alloc", "alloc-energy", "output", "ridge"}:
        stats = collect_ffn_statistics(model, calib, args.batch)
        print(
            f"# statistics pass: forward {stats.forward_s:.0f} s, "
            f"Gram updates {stats.gram_s:.0f} s",
            flush=True,
        )
    orders: dict[str, list[Tensor]] = {}
    order_s: dict[str, float] = {}
    if set(methods) & {"qr", "alloc", "alloc-energy", "ridge"}:
        t = time.perf_counter()
        orders["qr"] = [nested_order(s) for s in stats.gram]
        order_s["qr"] = time.perf_counter() - t
    if "output" in methods:
        p_max = max((keep_count(n, r) for r in only["output"] if r in ratios), default=1)
        t = time.perf_counter()
        orders["output"] = []
        for j, s in zip(junctions, stats.gram, strict=True):
            W = model.get_submodule(j.consumer).weight.detach()
            orders["output"].append(output_order(s, W, steps=p_max))
        order_s["output"] = time.perf_counter() - t
    paths: dict[str, list[dict[str, int]]] = {}
    for name, tokens in (("alloc", args.fisher_tokens), ("alloc-energy", None)):
        if name in methods:
            t = time.perf_counter()
            paths[name] = loss_allocation(model, junctions, stats, calib, args.batch, tokens)
            order_s[name] = order_s["qr"] + time.perf_counter() - t
    if order_s:
        print("# selection orders: " + ", ".join(f"{k} {v:.0f} s" for k, v in order_s.items()))

    rows: list[Row] = []
    kept_models: dict[str, nn.Module] = {}

    def record(method: str, ratio: float, p: int, reduced: nn.Module, seconds: float) -> None:
        ppl = perplexity(reduced, held, args.batch)
        rows.append(Row(method, ratio, p, ppl, seconds))
        print(
            f"{method:>9} {ratio:4.0%} p={p}: ppl {ppl:10.3f} ({100 * (ppl / base - 1):+.1f}%), "
            f"{seconds:.0f} s",
            flush=True,
        )

    for ratio in ratios:
        p = keep_count(n, ratio)
        for method in methods:
            if method in only and ratio not in only[method]:
                continue
            t = time.perf_counter()
            if method in ("magnitude", "wanda", "flap"):
                reduced = reduce_baseline(model, method, p, stats)
                prep = 0.0 if method == "magnitude" else stats.forward_s
            elif method in paths:
                config = first_removing(paths[method], n, ratio)
                reduced = reduce_allocated(model, junctions, stats, orders["qr"], config)
                prep = stats.forward_s + stats.gram_s + order_s[method]
                widths = [config[j.layer] for j in junctions]
                print(f"# {method} {ratio:.0%}: widths {widths}", flush=True)
            elif method in ("qr", "output", "ridge"):
                source = "output" if method == "output" else "qr"
                ridge = args.ridge if method == "ridge" else 0.0
                reduced = reduce_ours(model, junctions, stats, orders[source], p, ridge)
                prep = stats.forward_s + stats.gram_s + order_s[source]
            else:  # seq
                reduced, _ = reduce_sequential(model, junctions, calib, args.batch, p)
                prep = 0.0
            seconds = prep + time.perf_counter() - t
            mean_p = round(sum(config.values()) / len(config)) if method in paths else p
            record(method, ratio, mean_p, reduced, seconds)
            if method == "qr" and abs(ratio - 0.2) < 1e-9:
                kept_models["qr"] = reduced
            else:
                del reduced

    table = md_table(
        ["method", "removed", "p / n", "held-out ppl", "Δ ppl", "seconds"],
        [
            (
                r.method,
                f"{r.ratio:.0%}",
                f"{r.p} / {n}",
                f"{r.ppl:.2f}",
                f"{100 * (r.ppl / base - 1):+.1f}%",
                f"{r.seconds:.0f}",
            )
            for r in rows
        ],
    )
    print(
        f"\n#### FFN neurons removed in every layer: {calib.numel()} calibration tokens, "
        f"{held.numel()} held-out tokens (unreduced perplexity {base:.2f})\n\n{table}\n",
        flush=True,
    )

    tp_rows = []
    if args.throughput:
        p20 = keep_count(n, 0.2)
        widths = {"unreduced": n, f"20% (p={p20})": p20}
        for w in sorted({64 * (p20 // 64), 64 * math.ceil(p20 / 64)}):
            widths[f"rounded to 64 (p={w})"] = w
        models: dict[str, nn.Module] = {"unreduced": model}
        for name, w in widths.items():
            if name == "unreduced":
                continue
            if w == p20 and "qr" in kept_models:
                models[name] = kept_models["qr"]
                continue
            m = copy.deepcopy(model)
            for layer in decoder_layers(m):
                slice_ffn(layer.mlp, torch.arange(w))
            models[name] = m
        tps = throughput(models, (1, 16), args.tp_length, args.tp_repeats)
        for name in models:
            tp_rows.append(
                (
                    name,
                    widths[name],
                    f"{tps[name, 1]:.0f}",
                    f"{tps[name, 1] / tps['unreduced', 1]:.2f}",
                    f"{tps[name, 16]:.0f}",
                    f"{tps[name, 16] / tps['unreduced', 16]:.2f}",
                )
            )
        print(
            f"#### Throughput, full forward with logits, {args.tp_length}-token sequences "
            f"(best of {args.tp_repeats})\n\n"
            + md_table(
                [
                    "model",
                    "FFN width",
                    "batch 1 tok/s",
                    "× unreduced",
                    "batch 16 tok/s",
                    "× unreduced",
                ],
                tp_rows,
            )  # fmt: skip
            + "\n",
            flush=True,
        )
    print(f"# total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_description(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "base_ppl": base,
                    "rows": [r.__dict__ for r in rows],
                    "throughput": tp_rows,
                    "eval_s": eval_s,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
