"""Callbacks: the trainable-parameter table, the caption grid, RNG state in checkpoints, and the
data position that lets a resumed run continue with the next unseen batch."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from PIL import Image, ImageDraw


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


def to_pil(pixels: torch.Tensor, transform) -> Image.Image:
    """Undo the encoder's normalisation: [3, H, W] -> RGB image."""
    mean = torch.tensor(getattr(transform, "mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(getattr(transform, "std", (1.0, 1.0, 1.0)))[:, None, None]
    array = ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def caption_grid(items: list[tuple[Image.Image, str, str]], *, columns: int = 4, scale: int = 3) -> Image.Image:
    """Tiles of (image, generated, reference); a generated caption that differs is drawn in red."""
    side = max(image.width for image, _, _ in items) * scale
    text_h, pad, line_h = 84, 6, 12
    rows = (len(items) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    width = max(16, side // 6)
    for i, (image, pred, ref) in enumerate(items):
        x, y = pad + (i % columns) * (side + pad), pad + (i // columns) * (side + text_h + pad)
        grid.paste(image.resize((side, side), Image.NEAREST), (x, y))
        ok = pred.strip().rstrip(".").lower() == ref.strip().rstrip(".").lower()
        gen, ref_lines = textwrap.wrap("gen: " + pred, width)[:3], textwrap.wrap("ref: " + ref, width)[:3]
        draw.multiline_text((x, y + side + 2), "\n".join(gen), fill="black" if ok else "red", spacing=2)
        draw.multiline_text((x, y + side + 4 + line_h * len(gen)), "\n".join(ref_lines), fill="gray", spacing=2)
    return grid
