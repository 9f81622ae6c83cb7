"""Cost of ``targets="auto"`` discovery on Llama-shaped decoders, against one full forward.

Random-init Hugging Face ``LlamaForCausalLM`` models (no weights are downloaded):

* ``tiny-4`` and ``tiny-8``: hidden 32, FFN 16, 2 heads, 4 and 8 layers, vocabulary 50;
* ``smollm``: the shape of SmolLM-135M (hidden 576, FFN 1536, 30 layers, 9 heads, 3 key/value
  heads, vocabulary 49152, tied embeddings).

For each model the script finds the junctions with
:func:`~lightning_neuronprune.structure.discovery.auto_junctions` on one probe batch (8 sequences
of 32 tokens by default) and prints: the whole-model forward passes it ran (counted with a forward
pre-hook on the model), the block-scoped passes (one decoder layer run on its recorded inputs),
the cost in full-forward equivalents (a block pass counted as 1/L of a forward for L layers),
the wall time (best of ``--repeat`` runs; the counts are the same in each), and the wall
time of one full forward of the same batch in the same run (best of 3 before and 3 after), with
their ratio. On a shared machine, compare the ratio rather than the seconds.

    python benchmarks/bench_discovery.py                  # all three models
    python benchmarks/bench_discovery.py --models smollm --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers

from lightning_neuronprune.structure.discovery import auto_junctions
from lightning_neuronprune.structure.probe import JunctionProbe

SHAPES = {
    "tiny-4": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                   num_attention_heads=2, num_key_value_heads=2, vocab_size=50),
    "tiny-8": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=8,
                   num_attention_heads=2, num_key_value_heads=2, vocab_size=50),
    "smollm": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                   tie_word_embeddings=True),
}  # fmt: skip


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=256, **SHAPES[name])
    return transformers.LlamaForCausalLM(config).eval()


def _forward_s(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    times = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-4,tiny-8,smollm")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="discovery runs (best time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} thread(s); load {os.getloadavg()[0]:.2f}; probe batch "
          f"{args.samples} × {args.tokens} tokens")  # fmt: skip
    print("| model | layers | junctions | full passes | block passes | full-forward equivalents "
          "| discovery s | one forward s | discovery / forward |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = _model(name)
        layers = model.config.num_hidden_layers
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (args.samples, args.tokens), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        forward_s = _forward_s(model, batch)
        times = []
        for _ in range(args.repeat):
            forwards: list[int] = []
            hook = model.register_forward_pre_hook(lambda m, a, calls=forwards: calls.append(1))
            try:
                t0 = time.perf_counter()
                probe = JunctionProbe(model, batch)
                found = auto_junctions(model, probe=probe)
                times.append(time.perf_counter() - t0)
            finally:
                hook.remove()
        seconds = min(times)
        forward_s = min(forward_s, _forward_s(model, batch))
        block = getattr(probe, "block_passes", 0)
        cost = getattr(probe, "cost", float(len(forwards)))
        print(f"| {name} | {layers} | {len(found)} | {len(forwards)} | {block} | {cost:.2f} "
              f"| {seconds:.2f} | {forward_s:.3f} | {seconds / forward_s:.1f} |")  # fmt: skip
        assert len(found) == layers, found


if __name__ == "__main__":
    main()
