"""Callbacks: the trainable-parameter table, the caption grid, RNG state in checkpoints, and the
data position that lets a resumed run continue with the next unseen batch."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from vlm.eval.grid import caption_grid, to_pil


class TrainingState(L.Callback):
    """Always on (added by the CLI): prints the parameter table, counts consumed batches for the
    data module, and keeps the RNG states in checkpoints so that a resumed run is exact."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        table = getattr(pl_module, "parameter_table", None)
        if table is not None:
            rank_zero_info(f"trainable parameters (stage {pl_module.stage!r}):\n{table}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if hasattr(trainer.datamodule, "batches_consumed"):
            trainer.datamodule.batches_consumed += 1

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


class CaptionGrid(L.Callback):
    """After each validation, save a PNG grid: image, generated caption, reference caption."""

    def __init__(self, max_images: int = 16, columns: int = 4, scale: int = 3) -> None:
        self.max_images, self.columns, self.scale = max_images, columns, scale
        self.last_path: Path | None = None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run before the module's hook that collects captions.
        captions = [c for c in pl_module.last_captions if c[0] is not None][: self.max_images]
        if not captions or trainer.sanity_checking:
            return
        transform = pl_module.model.vision.transform
        grid = caption_grid([(to_pil(img, transform), pred, ref) for img, pred, ref in captions], columns=self.columns, scale=self.scale)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "captions"
        folder.mkdir(parents=True, exist_ok=True)
        self.last_path = folder / f"step{trainer.global_step:06d}.png"
        grid.save(self.last_path)
        rank_zero_info(f"caption grid: {self.last_path}")
