"""Emoji: a real captioned image set built from Debian packages, no download from the web.

Every fully-qualified emoji of Unicode's `emoji-test.txt` (Debian's `unicode-data`:
/usr/share/unicode/emoji/emoji-test.txt) is drawn with the Noto Color Emoji font (Debian's
`fonts-noto-color-emoji`: /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf) and captioned with
its CLDR name in lower case: "red apple", "woman firefighter: medium-dark skin tone",
"flag: france", "keycap: 1". The font is a CBDT bitmap font that only loads at size 109; glyphs
are drawn in colour at that size, cropped, scaled down and pasted onto a background.

Variants: `per_emoji` images per emoji. Variant 0 is canonical (centred, 0.8 of the side, plain
white); the others draw a scale (0.4-0.9 of the side), a position and a background (a plain
colour or a two-colour gradient, any colours) from `random.Random(f"vlm-emoji/{seed}/{codepoints}/
{variant}")`, so a sample depends only on (seed, emoji, variant, size) and two runs give
byte-identical shards (with the same Pillow, FreeType and zlib).

Skipped, counted by reason: emoji the font draws as nothing (blank glyph), as its .notdef box,
or as more than one glyph (a sequence the font, or Pillow without raqm, does not join).

Split rule: an emoji goes to val when a hash of its *base name* falls in the lowest
`val_fraction` of the hash range (`vlm.data.writer.split_of`). The base name is the CLDR name
without its qualifier after ":" (skin tones, hair, the people of a kiss or family) and without
the words man, woman, person, men, women, people and "and" ("woman firefighter: dark skin tone"
-> "firefighter"; "man", "woman: red hair" -> "person"); flags and keycaps keep their whole
name. All variants, skin tones and genders of one base therefore land in the same split, and val
holds emoji whose names never appear whole in train.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from vlm.data.convert import InputError, SkipSample
from vlm.data.shapes import encode_png
from vlm.data.writer import SplitSummary, SplitWriter, split_of

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_NAMES = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL = "apt-get install fonts-noto-color-emoji unicode-data"
BITMAP_SIZE = 109  # the only size at which NotoColorEmoji's CBDT bitmaps load
MIN_SIZE, MAX_SIZE = 16, 512
_LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")
_PEOPLE_WORDS = frozenset({"man", "woman", "person", "men", "women", "people", "and"})
_WHOLE_NAMES = ("flag:", "keycap:")  # each flag and keycap is its own base
_NOTDEF = "\U0010fffd"  # a private-use code point no emoji font maps: shows the .notdef glyph


@dataclass(frozen=True)
class Emoji:
    text: str  # the code point sequence
    name: str  # CLDR name, lower case
    group: str
    subgroup: str

    @property
    def codepoints(self) -> str:
        """"1f9d1-200d-1f692": the sample key stem."""
        return "-".join(f"{ord(c):x}" for c in self.text)

    @property
    def base(self) -> str:
        return base_name(self.name)


def base_name(name: str) -> str:
    """The split group of an emoji name (module docstring): "man firefighter: light skin tone" ->
    "firefighter", "kiss: woman, man" -> "kiss", "flag: france" -> "flag: france"."""
    name = name.lower()
    if name.startswith(_WHOLE_NAMES):
        return name
    words = [w for w in name.split(":")[0].split() if w not in _PEOPLE_WORDS]
    return " ".join(words) or "person"


def load_emoji(path: str | os.PathLike = DEFAULT_NAMES) -> list[Emoji]:
    """The fully-qualified emoji of an `emoji-test.txt`, in its (CLDR) order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"emoji names {path} not found: install Debian's unicode-data "
                         f"({INSTALL}) or pass --names PATH to an emoji-test.txt")
    emoji, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip().lower()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip().lower()
        elif match := _LINE.match(line.strip()):
            text = "".join(chr(int(c, 16)) for c in match.group(1).split())
            emoji.append(Emoji(text, match.group(2).strip().lower(), group, subgroup))
    if not emoji:
        raise InputError(f"{path}: no fully-qualified emoji found (expected Unicode's emoji-test.txt)")
    return emoji


def load_font(path: str | os.PathLike = DEFAULT_FONT) -> ImageFont.FreeTypeFont:
    """Noto Color Emoji at its bitmap size; `InputError` naming the Debian package if missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"emoji font {path} not found: install Debian's fonts-noto-color-emoji "
                         f"({INSTALL}) or pass --font PATH")
    try:
        return ImageFont.truetype(str(path), BITMAP_SIZE)
    except OSError as err:
        raise InputError(f"cannot load {path} at size {BITMAP_SIZE} ({err}): expected a colour "
                         "bitmap emoji font such as fonts-noto-color-emoji's NotoColorEmoji.ttf") from None


def _draw(font: ImageFont.FreeTypeFont, text: str) -> Image.Image:
    """`text` in colour on a transparent canvas, cropped to its visible pixels (maybe 0x0)."""
    _, _, right, bottom = font.getbbox(text)
    canvas = Image.new("RGBA", (max(right, 1), max(bottom, 1)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    return canvas.crop(box) if box else canvas.crop((0, 0, 0, 0))


class GlyphRenderer:
    """Draws one emoji as a cropped RGBA glyph, or raises `SkipSample` saying why it cannot."""

    def __init__(self, font: ImageFont.FreeTypeFont):
        self.font = font
        self.notdef = _draw(font, _NOTDEF)
        self.advance = font.getlength("\U0001f600") or float(BITMAP_SIZE)  # one glyph's width

    def __call__(self, text: str) -> Image.Image:
        if self.font.getlength(text) > 1.5 * self.advance:
            raise SkipSample("not one glyph (sequence not joined by the font)")
        glyph = _draw(self.font, text)
        if glyph.width == 0:
            raise SkipSample("not in the font (blank glyph)")
        if glyph.size == self.notdef.size and glyph.tobytes() == self.notdef.tobytes():
            raise SkipSample("not in the font (.notdef box)")
        return glyph


def _background(rng: random.Random, size: int) -> Image.Image:
    first = tuple(rng.randrange(256) for _ in range(3))
    if rng.random() < 0.5:
        return Image.new("RGB", (size, size), first)
    second = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = {"down": ramp[:, None], "right": ramp[None, :],  # [H, W] gradient weights
         "diagonal": (ramp[:, None] + ramp[None, :]) / 2}[rng.choice(("down", "right", "diagonal"))]
    t = np.broadcast_to(t, (size, size))[..., None]  # [H, W, 1]
    pixels = (1 - t) * np.array(first, np.float32) + t * second  # [H, W, 3]
    return Image.fromarray(pixels.round().astype(np.uint8))


def compose(glyph: Image.Image, *, seed: int, key: str, variant: int, size: int) -> Image.Image:
    """An RGB `size` x `size` image of the glyph: variant 0 canonical, others random (see above)."""
    rng = random.Random(f"vlm-emoji/{seed}/{key}/{variant}")  # str seeds hash stably
    scale = 0.8 if variant == 0 else rng.uniform(0.4, 0.9)
    factor = scale * size / max(glyph.size)
    width, height = (max(1, round(side * factor)) for side in glyph.size)
    small = glyph.resize((width, height), Image.LANCZOS)
    if variant == 0:
        x, y = (size - width) // 2, (size - height) // 2
        image = Image.new("RGB", (size, size), (255, 255, 255))
    else:
        x, y = rng.randint(0, size - width), rng.randint(0, size - height)
        image = _background(rng, size)
    image.paste(small, (x, y), small)  # the glyph's alpha as the mask
    return image


def emoji_samples(emoji: Emoji, glyph: Image.Image, *, seed: int, per_emoji: int, size: int) -> list[dict]:
    """Caption samples of one emoji: key `{codepoints}_{variant}`, `png`, `txt`, `json`."""
    meta = {"caption": emoji.name, "base": emoji.base, "emoji": emoji.text,
            "group": emoji.group, "subgroup": emoji.subgroup}
    return [{"__key__": f"{emoji.codepoints}_{variant}", "txt": emoji.name,
             "png": encode_png(compose(glyph, seed=seed, key=emoji.codepoints, variant=variant, size=size)),
             "json": {**meta, "variant": variant}}
            for variant in range(per_emoji)]


def make_emoji_dataset(out: str | os.PathLike, *, size: int = 64, seed: int = 0, per_emoji: int = 4,
                       val_fraction: float = 0.1, font: str | os.PathLike = DEFAULT_FONT,
                       names: str | os.PathLike = DEFAULT_NAMES, limit: int | None = None,
                       shard_size: int = 10_000, shard_bytes: int = 1 << 30,
                       overwrite: bool = False, progress: bool = False) -> tuple[dict, SplitSummary]:
    """Write `out/train-*.tar`, `out/val-*.tar` (caption format) and `out/manifest.json`.

    `limit` keeps the first N emoji of the names file. Returns `(manifest, summary)`: the manifest
    holds the settings, emoji listed and rendered, samples, base names and shards per split and
    emoji skipped by reason; the `SplitSummary` is the writers'. Raises `InputError` when the font
    or the names file is missing.
    """
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"emoji image size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if per_emoji < 1 or (limit is not None and limit < 1):
        raise ValueError(f"per_emoji and limit must be >= 1, got {per_emoji} and {limit}")
    render = GlyphRenderer(load_font(font))  # font first: its error names the package to install
    listed = load_emoji(names)[:limit]
    out = Path(out)
    bases: dict[str, set[str]] = {}
    rendered = 0
    with SplitWriter(out, val_fraction=val_fraction, max_count=shard_size, max_bytes=shard_bytes,
                     overwrite=overwrite) as writer:
        for item in tqdm(listed, unit="emoji", desc="emoji", disable=not progress):
            try:
                glyph = render(item.text)
            except SkipSample as skip:
                writer.skip(skip.reason, key=item.name)
                continue
            for sample in emoji_samples(item, glyph, seed=seed, per_emoji=per_emoji, size=size):
                writer.write(sample, group=item.base)
            split = split_of(item.base, val_fraction) if val_fraction else "train"  # as the writer did
            bases.setdefault(split, set()).add(item.base)
            rendered += 1
    summary = writer.summary
    manifest = {"dataset": "vlm-emoji", "version": 1, "seed": seed, "image_size": size,
                "per_emoji": per_emoji, "val_fraction": val_fraction, "limit": limit,
                "font": str(font), "names": str(names), "emoji_listed": len(listed),
                "emoji_rendered": rendered, "skipped": dict(sorted(summary.skipped.items())),
                "samples": dict(summary.splits), "bases": {s: len(b) for s, b in sorted(bases.items())},
                "shards": {s: [Path(p).name for p in w.summary.shards] for s, w in writer.writers.items()}}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    return manifest, summary
