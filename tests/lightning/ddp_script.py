"""Run by tests/test_ddp.py: a 2-process CPU DDP fit with the callback; each rank writes what it
ended with, so the test can compare ranks."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for lit_models
from lit_models import BlobsData, LitMLP, applied, results

from lightning_neuronprune import NeuronEliminationCallback, read_plan


def main(out: Path) -> None:
    pl.seed_everything(0, workers=True)
    callback = NeuronEliminationCallback(
        targets=["net.0", "net.2"], ranks="all", max_degradation=0.02, weights="best"
    )
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", monitor="val_loss")
    model = LitMLP()
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", default_root_dir=out,
        logger=CSVLogger(out, name="logs"), enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoint, callback],
    )  # fmt: skip
    trainer.fit(model, datamodule=BlobsData())
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().numpy().tobytes())
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "state_sha256": digest.hexdigest(),
        "plan": read_plan(model),
        "applied": applied(callback),
        "results": results(callback),
        "report_paths": [str(p) for p in callback.report_paths],
        "source_checkpoint": callback.source_checkpoint_path,
        "reduced_checkpoint": callback.reduced_checkpoint_path,
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main(Path(sys.argv[1]))
