"""A PNG grid of images with their generated and reference captions (no Lightning, no matplotlib)."""

from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw

from vlm.eval.metrics import normalise_caption


def to_pil(pixels: torch.Tensor, transform) -> Image.Image:
    """Undo an encoder transform's normalisation: [3, H, W] -> RGB image."""
    mean = torch.tensor(getattr(transform, "mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(getattr(transform, "std", (1.0, 1.0, 1.0)))[:, None, None]
    array = ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def caption_grid(items: list[tuple[Image.Image, str, str]], *, columns: int = 4, scale: int = 3) -> Image.Image:
    """Tiles of (image, generated, reference); a generated caption that differs is drawn in red."""
    if not items:
        raise ValueError("caption_grid needs at least one item")
    side = max(image.width for image, _, _ in items) * scale
    text_h, pad, line_h = 84, 6, 12
    columns = min(columns, len(items))
    rows = (len(items) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    width = max(16, side // 6)
    for i, (image, pred, ref) in enumerate(items):
        x, y = pad + (i % columns) * (side + pad), pad + (i // columns) * (side + text_h + pad)
        grid.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
        ok = normalise_caption(pred) == normalise_caption(ref)
        gen, ref_lines = textwrap.wrap("gen: " + pred, width)[:3], textwrap.wrap("ref: " + ref, width)[:3]
        draw.multiline_text((x, y + side + 2), "\n".join(gen), fill="black" if ok else "red", spacing=2)
        draw.multiline_text((x, y + side + 4 + line_h * len(gen)), "\n".join(ref_lines), fill="gray", spacing=2)
    return grid
