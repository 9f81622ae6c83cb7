"""Train a small transformer on MNIST patches, then remove redundant FFN neurons without retraining.

The model (:class:`~lightning_neuronprune.testing.models.PatchTransformer`) reads each image as 49
tokens
of 4×4 pixels. Its batches are Hugging Face-style dicts (``pixel_values``, ``attention_mask``,
``labels``), and blank patches are padding: the ``attention_mask`` removes them from attention and
pooling, and the callback's statistics count only the real tokens.

``NeuronEliminationCallback(targets="auto")`` finds the FFN pairs ``blocks.<i>.mlp.fc1`` →
``blocks.<i>.mlp.fc2`` by probing the model on a batch (the attention projections and the layers
before a residual sum are refused), sweeps the kept width of every FFN, searches joint
configurations of all of them under one accuracy budget, and applies the lowest-energy one.

Run from the repository root (a few minutes on two idle CPU cores with the defaults)::

    python examples/transformer.py
    python examples/transformer.py --epochs 1 --limit-train 5000 --joint none   # a quick look
    python examples/transformer.py --depth 6                                     # 6 blocks

The MNIST IDX files are read from ``--data-dir`` (default: ``$NEURONPRUNE_MNIST_DIR``, else
``../shared/data/mnist`` relative to the working directory or to the repository root).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytorch_lightning as pl
import torch
from _common import KeepUnreduced, default_data_dir
from torch.utils.data import DataLoader

from lightning_neuronprune import NeuronEliminationCallback
from lightning_neuronprune.search.strategies import STRATEGIES
from lightning_neuronprune.testing.datasets import MNISTDataModule, has_mnist
from lightning_neuronprune.testing.models import LitPatchTransformer, patch_mask


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``(image, label)`` pairs → a dict batch; blank 4×4 patches are padding."""
    x = torch.stack([s[0] for s in samples])
    return {
        "pixel_values": x,
        "attention_mask": patch_mask(x),
        "labels": torch.stack([torch.as_tensor(s[1]) for s in samples]),
    }


class PatchData(MNISTDataModule):
    """MNIST with dict batches of patch tokens (see :func:`collate`)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=500, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=500, collate_fn=collate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=default_data_dir(), help="MNIST IDX directory")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images")
    parser.add_argument("--val-size", type=int, default=2000, help="held-out training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--dim", type=int, default=64, help="token width")
    parser.add_argument("--hidden", type=int, default=256, help="FFN width")
    parser.add_argument(
        "--max-degradation", type=float, default=0.01,
        help="the accuracy budget ε as a fraction (0.01 = 1 point)",
    )  # fmt: skip
    parser.add_argument("--joint", choices=[*STRATEGIES, "none"], default="greedy")
    parser.add_argument(
        "--grid", type=int, default=16, help="kept widths per FFN: the fractions k/grid of n"
    )
    parser.add_argument("--max-samples", type=int, default=4000, help="images for statistics")
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not has_mnist(args.data_dir):
        parser.error(f"the MNIST IDX files are not in {args.data_dir!r}: pass --data-dir")
    if args.epochs < 1 or args.grid < 2 or args.depth < 1:
        parser.error("--epochs and --depth must be at least 1, --grid at least 2")
    return args


@torch.no_grad()
def compare(
    before: LitPatchTransformer, after: LitPatchTransformer, loader: DataLoader
) -> dict[str, Any]:
    """Test accuracy of both models, their prediction agreement and the mean cosine similarity
    of their logits."""
    before.eval()
    after.eval()
    right_b = right_a = agree = n = 0
    cosine = 0.0
    for batch in loader:
        lb, la = before(batch), after(batch)
        y = batch["labels"]
        right_b += int((lb.argmax(-1) == y).sum())
        right_a += int((la.argmax(-1) == y).sum())
        agree += int((lb.argmax(-1) == la.argmax(-1)).sum())
        cosine += float(torch.nn.functional.cosine_similarity(lb, la, dim=-1).sum())
        n += len(y)
    return {"acc_before": right_b / n, "acc_after": right_a / n, "agreement": agree / n,
            "cosine": cosine / n}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    pl.seed_everything(args.seed, workers=True)
    dm = PatchData(
        args.data_dir, batch_size=args.batch_size, val_size=args.val_size,
        limit_train=args.limit_train,
    )  # fmt: skip
    arch = {"depth": args.depth, "dim": args.dim, "hidden": args.hidden}
    model = LitPatchTransformer(lr=args.lr, epochs=args.epochs, **arch)
    snapshot = KeepUnreduced()
    pruner = NeuronEliminationCallback(
        targets="auto",
        ranks=[k / args.grid for k in range(1, args.grid + 1)],
        max_degradation=args.max_degradation,
        joint=None if args.joint == "none" else args.joint,
        max_samples=args.max_samples,
        verbose=args.verbose,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        default_root_dir=args.log_dir,
        callbacks=[snapshot, pruner],  # the snapshot's on_train_end runs first
        enable_checkpointing=False,
        deterministic="warn",
        log_every_n_steps=50,
    )
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - started

    unreduced = LitPatchTransformer(lr=args.lr, epochs=args.epochs, **arch)
    unreduced.load_state_dict(snapshot.state_dict)
    ffn = [f"net.blocks.{i}.mlp.fc1" for i in range(args.depth)]
    widths = {name: model.get_submodule(name).out_features for name in ffn}
    total = args.hidden * args.depth
    kept = sum(widths.values())

    print("\n=== Transformer FFN reduction " + "=" * 40)
    result = pruner.result
    assert result is not None  # the fit finished, so the callback ran
    print(f"found junctions: {sorted(result.points)}")
    for name, width in widths.items():
        print(f"  {name:<22} {args.hidden:>4} -> {width:>4} neurons")
    print(f"FFN neurons removed: {total - kept} of {total} ({(total - kept) / total:.1%})")
    c = result.decision.chosen
    if c is not None:
        print(
            f"validation accuracy {c.accuracy:.4f} (drop {c.accuracy_drop:+.4f}, budget "
            f"{args.max_degradation}); energy {c.energy_ratio:.2f}x, parameter memory "
            f"{c.memory_ratio:.2f}x lower (modelled)"
        )
    dm.setup("test")
    held_out = compare(unreduced, model, dm.test_dataloader())
    print(
        f"test set (held out): accuracy {held_out['acc_before']:.4f} before, "
        f"{held_out['acc_after']:.4f} after; prediction agreement {held_out['agreement']:.4f}, "
        f"mean cosine of the logits {held_out['cosine']:.4f}"
    )
    print(f"total time {time.perf_counter() - started:.0f}s (fit and reduction {fit_seconds:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
