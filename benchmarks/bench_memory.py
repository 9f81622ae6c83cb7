"""Peak extra memory of the streamed sequential reduction on a 1B-parameter Llama shape, on the CPU.

The model is a random-init ``LlamaForCausalLM`` with the shape of Llama-3.2-1B (16 decoder layers,
hidden 2048, SwiGLU FFNs of n = 8192, 32 heads, 8 key-value heads, tied embeddings) and a 32000
vocabulary, in float32: about 1.04 B parameters, 4.2 GB. Its weights are not "extra"; everything
else is. The bound to meet is

    3 · n² · 8 bytes  +  one block's activations

(three n × n float64 matrices, 1.5 GiB at n = 8192, plus what one decoder block needs to run on
one calibration batch). Parts, each measured as the peak resident set size (a 2 ms sampling
thread) above the RSS just before it, after ``gc.collect()``:

* ``block``: one decoder block run on one calibration batch (its input hidden states included):
  the activation term of the bound, measured;
* ``all-at-once``: what the search collects today, every junction's ``G`` in one full pass, for
  ``--all-at-once`` junctions (16 of them, 8 GiB, would not fit next to the model on a shared
  24 GiB machine; the figure scales by ``n² · 8`` bytes per junction, printed);
* ``fit``: one junction's selection, least-squares refit and surgery at ``p = --fit-keep · n``
  on full-rank statistics (a synthetic positive definite ``G``, since the calibration tokens
  here are fewer than n), ``G`` included, done as ``reduce_streamed`` does it: the workspace at
  a realistic width;
* ``streamed``: :func:`~lightning_neuronprune.search.streaming.reduce_streamed` over all 16
  junctions at ``--keep · n`` (well posed: p below the calibration tokens), statistics only
  from the calibration batches, each pass stopped after its consumer.

Figures are printed as ratios to the bound. Timing is not the point: one torch thread.

    python benchmarks/bench_memory.py                       # the 1B shape, about 13 min here
    python benchmarks/bench_memory.py --layers 2 --hidden 256 --ffn 1024 --vocab 1000   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meters import PeakProbe, rss
from report import machine_description, md_table

from lightning_neuronprune import FitOptions, JunctionStatistics, ModelIO, reduce_junction
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.search.streaming import reduce_streamed
from lightning_neuronprune.structure.targets import resolve_targets

GIB = 2**30


def trim() -> None:
    """Collect garbage and hand freed heap back to the system (glibc ``malloc_trim``)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Phases:
    """Peak RSS per phase of a run, above the RSS when the run started: the sampling thread of a
    :class:`PeakProbe` also files each sample under the phase in progress."""

    def __init__(self, probe: PeakProbe) -> None:
        self.probe, self.current, self.base = probe, "other", 0
        self.peak: dict[str, int] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            extra = rss() - self.base
            self.peak[self.current] = max(self.peak.get(self.current, 0), extra)
            time.sleep(0.002)

    def wrap(self, name: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.current = name
            try:
                return fn(*args, **kwargs)
            finally:
                self.current = "other"

        return wrapped

    def __enter__(self) -> Phases:
        trim()
        self.base = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


class TrimmedProbe(PeakProbe):
    """:class:`PeakProbe` that first hands freed heap back to the system (glibc ``malloc_trim``),
    so that memory freed by an earlier part is not reused unseen by the next one."""

    def measure(self, fn):  # type: ignore[no-untyped-def]
        trim()
        return super().measure(fn)


def build(args: argparse.Namespace) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True, pad_token_id=0, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def measure_fit(
    probe: PeakProbe, model: nn.Module, args: argparse.Namespace, p: int, g: torch.Generator
) -> tuple[float, int]:
    """Seconds and peak extra bytes (``G`` included) of ``reduce_junction`` at p on a copy of the
    last FFN, with a synthetic positive definite ``G``."""
    n, d = args.ffn, args.hidden
    holder = nn.Sequential()
    holder.add_module("mlp", copy.deepcopy(model.model.layers[args.layers - 1].mlp))
    (junction,) = resolve_targets(holder, ["mlp.gate_proj"], example=torch.randn(1, 4, d))
    R = torch.rand(n, n, dtype=torch.float64, generator=g)
    gram = R.add_(R.T.clone()).div_(2 * n)
    gram.diagonal().add_(2.0)  # diagonally dominant: positive definite
    stats = JunctionStatistics(gram, torch.zeros(n, dtype=torch.float64), 1)
    del R, gram

    def fit() -> None:  # as reduce_streamed fits: G turned into the moment in place, no copy
        moment = stats.normalize_().gram
        reduce_junction(holder, junction, stats, p, method=args.method, moment=moment)

    _, seconds, peak = probe.measure(fit)
    return seconds, peak + n * n * 8  # G was made before the measurement started: count it


def gib(x: float) -> str:
    return f"{x / GIB:.3f}"


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sequences", type=int, default=4, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="sequences per calibration batch")
    ap.add_argument("--keep", type=float, default=0.1, help="kept fraction, streamed run")
    ap.add_argument("--fit-keep", type=float, default=0.8, help="kept fraction, the fit part")
    ap.add_argument("--method", default="qr")
    ap.add_argument("--all-at-once", type=int, default=4, help="junctions of the baseline")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probe = TrimmedProbe()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()  # fmt: skip
    print(f"machine: {machine_description()}; commit {commit}; load {load()}", flush=True)

    started = time.perf_counter()
    before_model = rss()
    model = build(args)
    n, d = args.ffn, args.hidden
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.sequences, args.seq_len), generator=g)
    data = [{"input_ids": ids[i : i + args.batch]} for i in range(0, args.sequences, args.batch)]
    with torch.no_grad():
        model(input_ids=ids[:1, :8])  # warm-up: thread pools, kernels
    gc.collect()
    print(
        f"model: {args.layers} layers, hidden {d}, FFN n = {n}, vocab {args.vocab}: "
        f"{params / 1e9:.3f} B parameters, RSS {gib(rss() - before_model)} GiB above the start "
        f"({time.perf_counter() - started:.0f} s to build); calibration {args.sequences} × "
        f"{args.seq_len} tokens in batches of {args.batch}",
        flush=True,
    )
    G_bytes = n * n * 8
    rows: list[list[str]] = []

    # the activation term: one decoder block on one calibration batch
    def one_block() -> None:
        with torch.no_grad():
            hidden = model.model.embed_tokens(data[0]["input_ids"])
            T = hidden.shape[1]
            position = torch.arange(T)[None]
            emb = model.model.rotary_emb(hidden, position)
            mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
            model.model.layers[0](hidden, attention_mask=mask, position_ids=position,
                                  position_embeddings=emb)  # fmt: skip

    _, seconds, act = probe.measure(one_block)
    bound = 3 * G_bytes + act
    print(
        f"bound: 3·n²·8 = {gib(3 * G_bytes)} GiB + one block's activations {gib(act)} GiB "
        f"(measured) = {gib(bound)} GiB; one n × n float64 G = {gib(G_bytes)} GiB",
        flush=True,
    )
    rows.append(["one block's activations (the bound's second term)", gib(act),
                 f"{act / bound:.2f}", f"{seconds:.1f}", load()])  # fmt: skip

    targets = resolve_targets(model, "auto", example={"input_ids": ids[:1, :16]})
    print(f"junctions: {len(targets)} ({targets[0].layer} ...)", flush=True)

    k = min(args.all_at_once, len(targets))
    consumers = [j.consumer for j in targets][:k]

    def all_at_once() -> None:
        stats = collect_statistics(model, consumers, data)
        assert all(s.gram.dtype == torch.float64 for s in stats.values())

    _, seconds, peak = probe.measure(all_at_once)
    rows.append([f"all-at-once statistics, {k} junctions (full passes, as the search does)",
                 gib(peak), f"{peak / bound:.2f}", f"{seconds:.1f}", load()])  # fmt: skip
    L = len(targets)
    print(
        f"all-at-once, {k} junctions: {gib(peak)} GiB = {peak / bound:.2f} × bound; "
        f"{L} junctions hold {L} · n²·8 = {gib(L * G_bytes)} GiB of G alone "
        f"({L * G_bytes / bound:.2f} × bound)",
        flush=True,
    )

    # one junction's fit at a realistic p on full-rank statistics, on a copy of one FFN
    p_fit = math.ceil(args.fit_keep * n)
    seconds, peak = measure_fit(probe, model, args, p_fit, g)
    rows.append([f"one junction's fit at p = {p_fit} on full-rank G, G included ({args.method})",
                 gib(peak), f"{peak / bound:.2f}", f"{seconds:.1f}", load()])  # fmt: skip
    print(f"fit at p = {p_fit}: {gib(peak)} GiB with G = {peak / bound:.2f} × bound", flush=True)
    gc.collect()

    p = math.ceil(args.keep * n)
    io = ModelIO(device="cpu", info=lambda line: print(f"  {line} (load {load()})", flush=True))

    def streamed() -> None:
        reduce_streamed(model, targets, args.keep, data, FitOptions(method=args.method), io=io)

    import lightning_neuronprune.search.streaming as streaming

    phases = Phases(probe)
    with contextlib.ExitStack() as stack:
        for name, attr in (("statistics", "collect_statistics"), ("fit", "reduce_junction")):
            original = getattr(streaming, attr)
            setattr(streaming, attr, phases.wrap(name, original))
            stack.callback(setattr, streaming, attr, original)
        trim()
        stack.enter_context(phases)
        _, seconds, peak = probe.measure(streamed)
    label = f"streamed reduction, {L} junctions, p = {p} ({args.method})"
    rows.append([label, gib(peak), f"{peak / bound:.2f}", f"{seconds:.1f}", load()])
    for name in ("statistics", "fit"):
        value = phases.peak.get(name, 0)
        rows.append([f"... of which the {name} passes" if name == "statistics" else
                     "... of which the selections, refits and surgeries", gib(value),
                     f"{value / bound:.2f}", "", ""])  # fmt: skip
    print(f"streamed: {gib(peak)} GiB = {peak / bound:.2f} × bound; {phases.peak}", flush=True)
    probe.close()
    print()
    print(
        f"#### Peak extra memory, {args.layers} layers, hidden {d}, n = {n}, "
        f"{args.sequences} × {args.seq_len} calibration tokens; bound {gib(bound)} GiB "
        f"(3·n²·8 = {gib(3 * G_bytes)} GiB + one block's activations {gib(act)} GiB)\n"
    )
    print(md_table(["part", "peak extra (GiB)", "× bound", "seconds", "load"], rows))


if __name__ == "__main__":
    main()
