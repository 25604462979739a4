"""Callbacks: the trainable-parameter table, the caption grid, RNG state in checkpoints, and the
data position that lets a resumed run continue with the next unseen batch."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

from vlm.eval.grid import caption_grid, to_pil


class TrainingState(L.Callback):
    """Always on (added by the CLI): prints the parameter table, counts consumed batches for the
    data module, and keeps the RNG states in checkpoints so that a resumed run is exact."""

    def __init__(self) -> None:
        self._restored: dict | None = None  # RNG states loaded from a checkpoint, not yet applied

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        table = getattr(pl_module, "parameter_table", None)
        if table is not None:
            lora = getattr(pl_module, "lora", None)  # its adapters: the table's "of which LoRA" column
            adapters = "" if lora is None else f", LoRA rank {lora.rank}" + (" on NF4 bases" if lora.quantize_base else "")
            rank_zero_info(f"trainable parameters (stage {pl_module.stage!r}{adapters}):\n{table}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._restored is not None:
            self._set_rng(self._restored)
            self._restored = None
        if hasattr(trainer.datamodule, "batches_consumed"):
            trainer.datamodule.batches_consumed += 1

    def state_dict(self) -> dict:
        if self._restored is not None:
            return self._restored
        version, internal, gauss = random.getstate()
        state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        # Applied at the first training batch, not now: making the data loader's iterator draws a
        # seed from the global RNG, which the uninterrupted run did before the saved state (random
        # draws in the forward, such as LoRA's dropout, then differ).
        self._restored = state

    @staticmethod
    def _set_rng(state: dict) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class SaveOnInterrupt(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM during `vlm fit`: finish the current step, write a complete
    checkpoint (`last.ckpt` in the checkpoint directory, atomically like the others) and stop, so
    that `--ckpt_path last` continues from there. A second signal stops at once without saving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.saved: Path | None = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second one: give up on saving
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to stop without saving)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # one rank's Ctrl-C stops them all at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        callbacks = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        folder = Path(callbacks[0].dirpath) if callbacks else Path(trainer.default_root_dir) / "checkpoints"
        self.saved = folder / "last.ckpt"
        trainer.save_checkpoint(self.saved)
        for cb in callbacks:  # ModelCheckpoint's own `last` is this file (no last-v1.ckpt beside it)
            if Path(cb.dirpath) == folder and hasattr(cb, "last_model_path"):
                cb.last_model_path = str(self.saved)
        rank_zero_info(f"interrupted at step {trainer.global_step}: saved {self.saved}; continue with --ckpt_path last")
        trainer.limit_val_batches = 0  # stopping runs a last validation otherwise: exit now
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class StepProgressBar(RichProgressBar):
    """Rich progress in optimizer steps: "step 1250/2500" (also after a resume), the training
    metrics, and no epoch counter or version number (step-based recipes have no epochs)."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.max_steps and trainer.max_steps > 0:
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class CaptionWriter(BasePredictionWriter):
    """`vlm predict`: every rank's captions, gathered and written by rank 0 as JSONL sorted by key,
    one {"key", "caption", "reference"} object a line (written to a temporary file, then renamed)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self.rows: list[dict] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        self.rows += prediction

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows, self.rows = self.rows, []
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.global_rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sorted(rows, key=lambda r: r["key"])))
        os.replace(tmp, self.path)
        rank_zero_info(f"{len(rows)} captions -> {self.path}")


class CaptionGrid(L.Callback):
    """After each validation, save a PNG grid: image, generated caption, reference caption."""

    def __init__(self, max_images: int = 16, columns: int = 4, scale: int = 3) -> None:
        self.max_images, self.columns, self.scale = max_images, columns, scale
        self.last_path: Path | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run before the module's hook that collects captions.
        if trainer.sanity_checking:
            return
        log_dir = trainer.log_dir  # a collective under multi-rank strategies: every rank asks
        captions = [c for c in pl_module.last_captions if c[0] is not None][: self.max_images]
        if not captions or trainer.global_rank != 0:
            return
        transform = pl_module.model.vision.transform
        grid = caption_grid([(to_pil(img, transform), pred, ref) for img, pred, ref in captions], columns=self.columns, scale=self.scale)
        folder = Path(log_dir or trainer.default_root_dir) / "captions"
        folder.mkdir(parents=True, exist_ok=True)
        self.last_path = folder / f"step{trainer.global_step:06d}.png"
        grid.save(self.last_path)
        rank_zero_info(f"caption grid: {self.last_path}")
