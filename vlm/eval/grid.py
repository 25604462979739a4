"""A PNG grid of images with their predicted and reference captions (no Lightning, no matplotlib).

Each tile is an image above its two captions, each under a label: "predicted" (green when it
matches the reference after normalisation, red when it differs) and "reference". Captions are
wrapped to the tile's width as measured with the font; one longer than `max_lines` lines ends in
"...", so no text is ever cut silently.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vlm.eval.metrics import normalise_caption

ELLIPSIS = "..."  # ASCII: PIL's bitmap fallback font has no "…"
MIN_TILE, MAX_TILE = 256, 384  # tile side in pixels: wide enough for a few words a line, small enough for a page
_COLOURS = {"match": (0, 120, 40), "differs": (200, 0, 0), "label": (110, 110, 110), "text": (0, 0, 0),
            "reference": (60, 60, 60), "backdrop": (235, 235, 235)}

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def to_pil(pixels: torch.Tensor, transform) -> Image.Image:
    """Undo an encoder transform's normalisation: [3, H, W] -> RGB image."""
    mean = torch.tensor(getattr(transform, "mean", (0.0, 0.0, 0.0)))[:, None, None]
    std = torch.tensor(getattr(transform, "std", (1.0, 1.0, 1.0)))[:, None, None]
    array = ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def load_font(size: int = 14) -> Font:
    """PIL's own font at `size` pixels (Pillow >= 10.1 with FreeType); else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def wrap_text(text: str, font: Font, width: int, *, max_lines: int) -> list[str]:
    """Lines of `text` no wider than `width` pixels in `font`, broken at spaces (a word wider than
    `width` alone is broken inside). Past `max_lines`, the last kept line ends in "..."."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width:
            cut = _fitting_prefix(word, font, width)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + ELLIPSIS) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + ELLIPSIS]
    return lines or [""]


def _fitting_prefix(word: str, font: Font, width: int) -> int:
    """Length of the longest prefix of `word` that fits `width` (at least 1, so wrapping progresses)."""
    cut = 1
    while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
        cut += 1
    return cut


def tile_lines(pred: str, ref: str, font: Font, width: int, *, max_lines: int) -> list[tuple[str, tuple[int, int, int]]]:
    """The text under one tile as (line, colour): the "predicted" label (green: matches the reference
    after normalisation, red: differs), the predicted caption, the "reference" label, the reference."""
    match = normalise_caption(pred) == normalise_caption(ref)
    lines = [("predicted (matches)" if match else "predicted (differs)", _COLOURS["match" if match else "differs"])]
    lines += [(line, _COLOURS["text"]) for line in wrap_text(pred, font, width, max_lines=max_lines)]
    lines += [("reference", _COLOURS["label"])]
    return lines + [(line, _COLOURS["reference"]) for line in wrap_text(ref, font, width, max_lines=max_lines)]


def caption_grid(items: list[tuple[Image.Image, str, str]], *, columns: int = 4, scale: int = 3,
                 font_size: int = 14, max_lines: int = 4) -> Image.Image:
    """Tiles of (image, predicted, reference) in rows of `columns`.

    Args:
        items: (image, predicted caption, reference caption) per tile.
        scale: images are drawn `scale` times the widest one's width, within [MIN_TILE, MAX_TILE]
            pixels, keeping their aspect (pixel art is enlarged nearest-neighbour, photos shrink bicubic).
        font_size: caption text height in pixels (PIL's bitmap font, fixed size, on old Pillow).
        max_lines: lines per caption; a longer caption ends in "...".
    """
    if not items:
        raise ValueError("caption_grid needs at least one item")
    font = load_font(font_size)
    side = min(max(max(image.width for image, _, _ in items) * scale, MIN_TILE), MAX_TILE)
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + max(3, font_size // 4)  # line spacing: a quarter of the font size
    pad = max(8, font_size // 2)
    texts = [tile_lines(pred, ref, font, side, max_lines=max_lines) for _, pred, ref in items]
    columns = min(columns, len(items))
    rows = (len(items) + columns - 1) // columns
    cell_w, cell_h = side + pad, side + pad + max(map(len, texts)) * line_h + pad
    grid = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, ((image, _, _), lines) in enumerate(zip(items, texts)):
        x, y = pad + (i % columns) * cell_w, pad + (i // columns) * cell_h
        _paste_image(grid, image, x, y, side)
        for row, (line, colour) in enumerate(lines):
            draw.text((x, y + side + pad // 2 + row * line_h), line, fill=colour, font=font)
    return grid


def _paste_image(grid: Image.Image, image: Image.Image, x: int, y: int, side: int) -> None:
    """`image` fitted into the side x side square at (x, y), centred on a grey backdrop."""
    image = image.convert("RGB")
    enlarge = max(image.size) < side
    fitted = ImageOps.contain(image, (side, side), Image.NEAREST if enlarge else Image.BICUBIC)
    grid.paste(_COLOURS["backdrop"], (x, y, x + side, y + side))
    grid.paste(fitted, (x + (side - fitted.width) // 2, y + (side - fitted.height) // 2))
