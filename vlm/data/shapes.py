"""Synthetic shapes: procedurally drawn scenes with exact, canonical captions.

A scene holds 1-3 shapes (circle, square, triangle; 6 colours; small or large) on a light
background (plain, gradient or noise). Shapes occupy disjoint column ranges with a gap between
them, so "left of" is never ambiguous and the canonical caption lists them left to right:

    "a large red circle left of a small blue square left of a small green triangle."

Shapes are drawn without anti-aliasing, so their pixels are exactly the palette colours; every
background channel is >= 190 while every palette colour has a channel <= 50, so a background
pixel never equals a shape colour. One image therefore has exactly one right caption (many
images share a caption: vertical positions, exact spacing and backgrounds are not described).

Five sample variants (formats in data/README.md): caption (one image + its caption), chat
(one image + 1-3 questions with short, exactly determined answers), interleaved (2-3 images,
each followed by its caption), preference (one image, the true caption chosen, the caption with
exactly one attribute wrong rejected) and fewshot (2-9 images whose captions name colours with
made-up words that only the document reveals; `vlm.data.shapes_fewshot`); the last two are
written only when asked for. `make_shapes_dataset` writes them as shards. Sample `i` of a split
depends only on `(seed, variant, split, i)`, so generation parallelises and the same seed gives
byte-identical shards (with the same Pillow/zlib). Train and validation draw from different
random streams: exact-duplicate captions across splits are expected (there are only so many),
identical images are not (continuous background colours and noise make a collision negligible).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlm.data.writer import ShardWriter

KINDS = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 130, 0), "yellow": (240, 200, 0),
    "green": (30, 160, 50), "blue": (30, 80, 220), "purple": (140, 50, 180),
}
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "gradient", "noise")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 96
_BG_LOW, _BG_NOISE = 190, 12  # background channels stay in [190, 255]
_MARGIN = 2


def shape_extent(size: str, image_size: int) -> int:
    """Side of a shape's square bounding box in pixels (64 px image: small 10, large 18)."""
    return round(image_size * (0.28 if size == "large" else 0.16))


def shape_gap(image_size: int) -> int:
    """Minimum empty columns between two shapes' bounding boxes."""
    return max(2, image_size // 32)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    x: int  # left column of the bounding box
    y: int  # top row of the bounding box
    extent: int  # side of the square bounding box

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render an image: `render_scene(scene)` is a pure function of it."""

    image_size: int
    background: str  # one of BACKGROUNDS
    background_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_seed: int  # noise seed; unused by plain and gradient backgrounds
    shapes: tuple[Shape, ...]  # left to right

    def as_dict(self) -> dict:
        """JSON-ready summary stored next to each image (shapes left to right)."""
        return {"background": self.background,
                "shapes": [{k: v for k, v in asdict(s).items() if k != "extent"} for s in self.shapes]}


def _light_colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(_BG_LOW + _BG_NOISE, 255) for _ in range(3))


def sample_scene(rng: random.Random, size: int = 64) -> Scene:
    """Draw a random scene: 1-3 shapes placed left to right with random spacing and heights."""
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size}")
    return place_shapes(rng, random_shapes(rng, rng.randint(1, 3)), size)


def random_shapes(rng: random.Random, count: int,
                  colours: Sequence[str] = tuple(COLOURS)) -> list[tuple[str, str, str]]:
    """`count` random `(kind, colour, size)` triples, colours drawn from `colours`."""
    return [(rng.choice(KINDS), rng.choice(colours), rng.choice(SIZES)) for _ in range(count)]


def place_shapes(rng: random.Random, attrs: Sequence[tuple[str, str, str]], size: int = 64) -> Scene:
    """A scene of the given 1-3 `(kind, colour, size)` shapes, left to right in that order, with
    random spacing, heights and background."""
    count = len(attrs)
    if not 1 <= count <= 3:
        raise ValueError(f"a scene holds 1-3 shapes, got {count}")
    extents = [shape_extent(s, size) for _, _, s in attrs]
    gap = shape_gap(size)
    slack = size - 2 * _MARGIN - sum(extents) - gap * (count - 1)
    # Spread the spare columns over the count+1 spaces around the shapes.
    cuts = sorted(rng.randint(0, slack) for _ in range(count))
    shapes, x, previous_cut = [], _MARGIN, 0
    for (kind, colour, size_name), extent, cut in zip(attrs, extents, cuts):
        x += cut - previous_cut
        y = rng.randint(_MARGIN, size - _MARGIN - extent)
        shapes.append(Shape(kind, colour, size_name, x, y, extent))
        x, previous_cut = x + extent + gap, cut
    background = rng.choice(BACKGROUNDS)
    colours = (_light_colour(rng), _light_colour(rng))
    return Scene(size, background, colours, rng.getrandbits(32), tuple(shapes))


def _background(scene: Scene) -> Image.Image:
    size, (first, second) = scene.image_size, scene.background_colours
    if scene.background == "plain":
        return Image.new("RGB", (size, size), first)
    if scene.background == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]  # [H, 1, 1]
        rows = (1 - t) * np.array(first, np.float32) + t * np.array(second, np.float32)  # [H, 1, 3]
        pixels = np.broadcast_to(rows, (size, size, 3))
        if scene.background_seed % 2:  # odd seeds run left to right instead of top to bottom
            pixels = pixels.transpose(1, 0, 2)
        return Image.fromarray(np.ascontiguousarray(pixels.round().astype(np.uint8)))
    noise = np.random.default_rng(scene.background_seed).integers(
        -_BG_NOISE, _BG_NOISE + 1, size=(size, size, 3), dtype=np.int16)
    pixels = np.clip(np.array(first, np.int16) + noise, _BG_LOW, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene to an RGB image of `image_size` x `image_size` pixels."""
    image = _background(scene)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        box = (s.x, s.y, s.x + s.extent - 1, s.y + s.extent - 1)  # inclusive corners
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def draw_scene(rng: random.Random, size: int = 64) -> tuple[Image.Image, Scene]:
    """Sample a scene and render it: `(image, scene)`."""
    scene = sample_scene(rng, size)
    return render_scene(scene), scene


def caption(scene: Scene) -> str:
    """The canonical caption: shapes left to right, joined by "left of"."""
    return format_caption([(s.size, s.colour, s.kind) for s in scene.shapes])


def format_caption(described: Sequence[tuple[str, str, str]]) -> str:
    """`[(size, colour, kind), ...]` left to right -> caption; the inverse of `parse_caption`."""
    return " left of ".join(f"a {size} {colour} {kind}" for size, colour, kind in described) + "."


def parse_caption(text: str) -> list[tuple[str, str, str]]:
    """Invert `caption`: `[(size, colour, kind), ...]` left to right; ValueError if malformed."""
    body = text.strip()
    if not body.endswith("."):
        raise ValueError(f"shapes caption must end with '.': {text!r}")
    shapes = []
    for phrase in body[:-1].split(" left of "):
        words = phrase.split()
        if (len(words) != 4 or words[0] != "a" or words[1] not in SIZES
                or words[2] not in COLOURS or words[3] not in KINDS):
            raise ValueError(f"not a shapes caption phrase: {phrase!r} in {text!r}")
        shapes.append((words[1], words[2], words[3]))
    return shapes


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes; fixed settings, so the same image always gives the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --- questions (chat variant) ------------------------------------------------------------------

# Attribute sets tried, shortest first, when naming a shape unambiguously.
_REFERENCE_ATTRS = (("kind",), ("colour",), ("size",), ("size", "kind"), ("colour", "kind"),
                    ("size", "colour"), ("size", "colour", "kind"))
_POSITIONS = {2: ("leftmost", "rightmost"), 3: ("leftmost", "middle", "rightmost")}


def refer(scene: Scene, index: int, *, avoid: str | None = None) -> str:
    """Shortest phrase naming only `scene.shapes[index]`, never using the attribute `avoid`.

    E.g. "the circle", "the red one", "the large red circle"; when several shapes are
    identical (or `avoid` leaves no unique description), the position: "the leftmost shape".
    """
    target = scene.shapes[index]
    for attrs in _REFERENCE_ATTRS:
        if avoid in attrs:
            continue
        same = [s for s in scene.shapes if all(getattr(s, a) == getattr(target, a) for a in attrs)]
        if len(same) == 1:
            words = [getattr(target, a) for a in ("size", "colour") if a in attrs]
            return " ".join(["the", *words, target.kind if "kind" in attrs else "one"])
    noun = "one" if avoid == "kind" else "shape"
    return f"the {_POSITIONS[len(scene.shapes)][index]} {noun}"


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """1-3 distinct (question, answer) pairs about the scene; answers are exact and short."""
    n = len(scene.shapes)
    i, j = rng.sample(range(n), 2) if n > 1 else (0, 0)
    shape = scene.shapes[i]
    pool = [
        ("How many shapes are there?", str(n)),
        (f"What colour is {refer(scene, i, avoid='colour')}?", shape.colour),
        (f"What shape is {refer(scene, i, avoid='kind')}?", shape.kind),
        (f"Is {refer(scene, i, avoid='size')} small or large?", shape.size),
    ]
    if n > 1:
        pool.append((f"How many shapes are left of {refer(scene, i)}?", str(i)))
        pool.append((f"Is {refer(scene, i)} left of {refer(scene, j)}?", "yes" if i < j else "no"))
    return rng.sample(pool, rng.randint(1, 3))


# --- wrong captions (preference variant) -------------------------------------------------------

WRONG_ATTRIBUTES = ("colour", "kind", "size", "count", "order")
_CHOICES = {"size": SIZES, "colour": tuple(COLOURS), "kind": KINDS}
_FIELDS = ("size", "colour", "kind")  # the order of `parse_caption`'s tuples


def wrong_caption(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """`(caption, attribute)`: the scene's caption with exactly one attribute wrong.

    colour / kind / size: one shape gets another value; count: one shape removed (2-3 shapes) or
    a random one inserted (1-2 shapes); order: two adjacent, different shapes swapped. The
    attribute is drawn uniformly from those possible in the scene (order needs two different
    neighbours), so `parse_caption` of the result differs from the scene in that attribute only.
    """
    described = [(s.size, s.colour, s.kind) for s in scene.shapes]
    swappable = [i for i in range(len(described) - 1) if described[i] != described[i + 1]]
    attribute = rng.choice([a for a in WRONG_ATTRIBUTES if a != "order" or swappable])
    wrong = list(described)
    if attribute in _CHOICES:
        index, field = rng.randrange(len(wrong)), _FIELDS.index(attribute)
        value = rng.choice([v for v in _CHOICES[attribute] if v != wrong[index][field]])
        wrong[index] = tuple(value if f == field else v for f, v in enumerate(wrong[index]))
    elif attribute == "count":
        if len(wrong) == 3 or (len(wrong) == 2 and rng.random() < 0.5):
            del wrong[rng.randrange(len(wrong))]
        else:
            wrong.insert(rng.randrange(len(wrong) + 1), tuple(rng.choice(_CHOICES[f]) for f in _FIELDS))
    else:
        index = rng.choice(swappable)
        wrong[index], wrong[index + 1] = wrong[index + 1], wrong[index]
    return format_caption(wrong), attribute


# --- samples -----------------------------------------------------------------------------------

def caption_sample(rng: random.Random, *, image_size: int = 64) -> dict:
    """Caption format: `png`, `txt` (the caption), `json` {"caption", "scene"}."""
    image, scene = draw_scene(rng, image_size)
    text = caption(scene)
    return {"png": encode_png(image), "txt": text, "json": {"caption": text, "scene": scene.as_dict()}}


def chat_sample(rng: random.Random, *, image_size: int = 64) -> dict:
    """Chat format: `0.png` and `json` {"messages": user [image, question] -> answer, ...}."""
    image, scene = draw_scene(rng, image_size)
    messages: list[dict] = []
    for turn, (question, answer) in enumerate(questions(scene, rng)):
        content = [{"type": "image"}, {"type": "text", "text": question}] if turn == 0 else question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"0.png": encode_png(image), "json": {"messages": messages, "scene": scene.as_dict()}}


def interleaved_sample(rng: random.Random, *, image_size: int = 64) -> dict:
    """Interleaved format: 2-3 images, each followed by its caption, then a shape count."""
    sample: dict = {}
    segments: list[dict] = []
    scenes = []
    for index in range(rng.randint(2, 3)):
        image, scene = draw_scene(rng, image_size)
        sample[f"{index}.png"] = encode_png(image)
        segments += [{"type": "image", "index": index}, {"type": "text", "text": caption(scene) + "\n"}]
        scenes.append(scene)
    total = sum(len(s.shapes) for s in scenes)
    segments[-1]["text"] += f"The {len(scenes)} pictures show {total} shapes in all."
    sample["json"] = {"segments": segments, "scenes": [s.as_dict() for s in scenes]}
    return sample


def preference_sample(rng: random.Random, *, image_size: int = 64) -> dict:
    """Preference format: `0.png`, `json` {"messages": user [image], "chosen": the caption,
    "rejected": it with one attribute wrong, "wrong": that attribute, "scene"}."""
    image, scene = draw_scene(rng, image_size)
    rejected, attribute = wrong_caption(scene, rng)
    messages = [{"role": "user", "content": [{"type": "image"}]}]  # the caption variant's prompt
    return {"0.png": encode_png(image), "json": {"messages": messages, "chosen": caption(scene),
                                                 "rejected": rejected, "wrong": attribute,
                                                 "scene": scene.as_dict()}}


def fewshot_sample(rng: random.Random, *, image_size: int = 64, held_out: bool = False) -> dict:
    """Few-shot format: an interleaved document whose captions name colours with the document's
    own made-up words, the last image's colours all shown before it (`vlm.data.shapes_fewshot`;
    `held_out`: the validation words)."""
    from vlm.data.shapes_fewshot import fewshot_document  # that module builds on this one

    return fewshot_document(rng, image_size=image_size, held_out=held_out)


VARIANTS = {"caption": caption_sample, "chat": chat_sample, "interleaved": interleaved_sample,
            "preference": preference_sample, "fewshot": fewshot_sample}
DEFAULT_VARIANTS = ("caption", "chat", "interleaved")  # written when no variant is named


def sample_rng(seed: int, variant: str, split: str, index: int) -> random.Random:
    """The random stream of one sample."""
    return random.Random(f"vlm-shapes/{seed}/{variant}/{split}/{index}")  # str seeds hash stably


def make_sample(variant: str, *, seed: int, split: str, index: int, image_size: int = 64) -> dict:
    """Sample `index` of a split; depends only on its arguments. Key: `{split}_{index:08d}`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown shapes variant {variant!r}; choose from {sorted(VARIANTS)}")
    options = {"held_out": split != "train"} if variant == "fewshot" else {}  # new words outside train
    rng = sample_rng(seed, variant, split, index)
    return {"__key__": f"{split}_{index:08d}", **VARIANTS[variant](rng, image_size=image_size, **options)}


# --- dataset -----------------------------------------------------------------------------------

def _make_sample_task(task: tuple[str, int, str, int, int]) -> dict:
    variant, seed, split, index, image_size = task
    return make_sample(variant, seed=seed, split=split, index=index, image_size=image_size)


def _write_split(writer: ShardWriter, tasks: list, pool, bar: tqdm) -> dict:
    samples = (pool.imap(_make_sample_task, tasks, chunksize=32) if pool
               else map(_make_sample_task, tasks))
    images = 0
    with writer:
        for sample in samples:  # in index order, whatever the worker count
            writer.write(sample)
            images += sum(1 for name in sample if name.endswith("png"))
            bar.update()
    summary = writer.summary.as_dict()
    return {"samples": summary["written"], "images": images, "shards": summary["shards"]}


def make_shapes_dataset(out: str | os.PathLike, train: int, val: int, seed: int, *,
                        image_size: int = 64, variants: Sequence[str] = DEFAULT_VARIANTS,
                        shard_size: int = 1000, shard_bytes: int = 1 << 30,
                        workers: int | None = None, overwrite: bool = False,
                        progress: bool = False) -> dict:
    """Write `out/{variant}/{split}-{index:06d}.tar` and `out/manifest.json`; return the manifest.

    `workers` processes render samples (default: all CPUs; 0 or 1 renders in this process).
    The manifest holds the seed, image size, split sizes, variants and, per variant and split,
    the samples, images and shard names written.
    """
    if not variants or set(variants) - set(VARIANTS):
        raise ValueError(f"shapes variants must be among {sorted(VARIANTS)}, got {list(variants)}")
    if train < 0 or val < 0:
        raise ValueError(f"sample counts must be >= 0, got train={train} val={val}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")
    out, splits, variants = Path(out), {"train": train, "val": val}, list(dict.fromkeys(variants))
    # All writers first: existing shards are refused before anything is generated.
    writers = {(variant, split): ShardWriter(out / variant, prefix=split, max_count=shard_size,
                                             max_bytes=shard_bytes, overwrite=overwrite)
               for variant in variants for split in splits}
    workers = (os.cpu_count() or 1) if workers is None else workers
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    bar = tqdm(total=len(variants) * (train + val), unit="sample", desc="shapes",
               disable=not progress)
    counts: dict[str, dict] = {}
    try:
        for (variant, split), writer in writers.items():
            tasks = [(variant, seed, split, i, image_size) for i in range(splits[split])]
            counts.setdefault(variant, {})[split] = _write_split(writer, tasks, pool, bar)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    manifest = {"dataset": "vlm-shapes", "version": 1, "seed": seed, "image_size": image_size,
                "splits": splits, "variants": variants, "counts": counts}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest
