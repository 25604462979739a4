"""Convert real corpora to shards: COCO captions, LLaVA instruction JSON, image folders.

Every converter streams its input into a `ShardWriter`, shows a progress bar, and returns the
writer's `WriteSummary`: samples written and skipped by reason ("missing image", "corrupt
image", ...). A bad sample never stops a conversion; a bad input file (unreadable JSON, wrong
top-level structure) does, with an `InputError` naming the file.

Images are copied byte for byte when their content is JPEG, PNG or WebP (the extension follows
the content, not the file name); other formats are re-encoded to PNG. Every image is fully
decoded once, so a corrupt one is skipped here rather than at training time.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from vlm.data.writer import ShardWriter, WriteSummary, sanitize_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_COPY_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: camera JPEG
_MARKER = re.compile(r"\n*<image>\n*")  # LLaVA's placeholder, with the newlines around it
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class InputError(ValueError):
    """An input file is unreadable or malformed as a whole; the message names the file."""


class SkipSample(Exception):
    """One sample cannot be converted; `reason` is its summary bucket."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, raising `InputError` that names the file on any failure."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read JSON from {path}: {err}") from err


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[str, bytes]:
    """Return `(extension, bytes)` for an image file, verified by a full decode.

    Raises `SkipSample` with reason "missing image", "corrupt image" or "image too large"
    (more than `max_pixels`, default PIL's `MAX_IMAGE_PIXELS`, checked before decoding).
    """
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SkipSample("missing image") from None
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data)) as image:
            if limit and image.width * image.height > limit:
                raise SkipSample("image too large")
            image.load()
            extension = _COPY_FORMATS.get(image.format)
            if extension is None:  # e.g. BMP, GIF (first frame), TIFF
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                extension, data = "png", buffer.getvalue()
    except SkipSample:
        raise
    except Image.DecompressionBombError:
        raise SkipSample("image too large") from None
    except Exception:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        raise SkipSample("corrupt image") from None
    return extension, data


def _resolve(images_dir: Path, relative: Any) -> Path:
    """`images_dir / relative`, refusing non-strings and paths that leave `images_dir`."""
    if not isinstance(relative, str) or not relative:
        raise SkipSample("bad image path")
    path = (images_dir / relative).resolve()
    if not path.is_relative_to(images_dir.resolve()):
        raise SkipSample("image path outside images dir")
    return path


def _drain(writer: ShardWriter, samples: Iterable[tuple[str, Any]], *, total: int,
           progress: bool, desc: str) -> WriteSummary:
    """Write `(key, sample-or-SkipSample)` pairs with a progress bar; return the summary."""
    with writer:
        for key, sample in tqdm(samples, total=total, unit="sample", desc=desc,
                                disable=not progress):
            try:
                key = sanitize_key(key)
            except ValueError:
                writer.skip("bad key", key=key)
                continue
            if isinstance(sample, SkipSample):
                writer.skip(sample.reason, key=key)
            else:
                writer.write({"__key__": key, **sample})
    return writer.summary


# --- COCO --------------------------------------------------------------------------------------

def _coco_samples(data: dict, images_dir: Path, per: str) -> Iterator[tuple[str, Any]]:
    captions: dict[Any, list[tuple[Any, str]]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann.get("image_id"), []).append((ann.get("id"), ann.get("caption")))
    known = {image.get("id") for image in data["images"]}
    for image_id in [i for i in captions if i not in known]:  # annotation order: deterministic
        for ann_id, _ in captions[image_id]:
            yield f"{image_id}_{ann_id}", SkipSample("unknown image id")
    for image in data["images"]:
        stem = Path(str(image.get("file_name", image.get("id")))).stem
        texts = []
        for ann_id, text in captions.get(image.get("id"), []):
            if isinstance(text, str) and text.strip():
                texts.append((ann_id, text.strip()))
            else:
                yield f"{stem}_{ann_id}", SkipSample("empty caption")
        if not texts:
            yield stem, SkipSample("no caption")
            continue
        try:
            extension, data_bytes = read_image(_resolve(images_dir, image.get("file_name")))
        except SkipSample as skip:
            keys = [stem] if per == "image" else [f"{stem}_{i}" for i, _ in texts]
            yield from ((key, skip) for key in keys)
            continue
        if per == "image":
            meta = {"caption": texts[0][1], "captions": [c for _, c in texts], "image_id": image["id"]}
            yield stem, {extension: data_bytes, "txt": texts[0][1], "json": meta}
        else:
            for ann_id, text in texts:
                meta = {"caption": text, "image_id": image["id"], "id": ann_id}
                yield f"{stem}_{ann_id}", {extension: data_bytes, "txt": text, "json": meta}


def convert_coco(captions: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                 *, per: str = "caption", progress: bool = True, **writer_args: Any) -> WriteSummary:
    """COCO captions JSON -> caption shards, one sample per caption or per image.

    Keys: `{file stem}_{annotation id}` (per caption) or `{file stem}` (per image, json holds
    `"captions"`: all of them, `"caption"`: the first). `writer_args` go to `ShardWriter`.
    """
    if per not in ("caption", "image"):
        raise ValueError(f"per must be 'caption' or 'image', got {per!r}")
    data = load_json(captions)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)
            and all(isinstance(x, dict) for x in data["images"] + data["annotations"])):
        raise InputError(f"{captions}: not COCO captions JSON (needs 'images' and 'annotations' lists)")
    total = len(data["annotations"]) if per == "caption" else len(data["images"])
    writer = ShardWriter(out, **writer_args)
    return _drain(writer, _coco_samples(data, Path(images), per), total=total,
                  progress=progress, desc="from-coco")


# --- LLaVA -------------------------------------------------------------------------------------

def _llava_content(value: str) -> tuple[str | list[dict], int]:
    """Split `<image>` markers out of a turn: `(content, number of images)`."""
    pieces = _MARKER.split(value)
    if len(pieces) == 1:
        return value, 0
    parts: list[dict] = []
    for index, piece in enumerate(pieces):
        if index:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts, len(pieces) - 1


def llava_record(record: Any, images_dir: Path) -> dict:
    """One LLaVA record -> chat sample members (`json`, `0.jpg`, ...); `SkipSample` if bad."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise SkipSample("bad record")
    messages, markers = [], 0
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SkipSample("bad record")
        if turn.get("from") not in _ROLES:
            raise SkipSample("unknown role")
        content, count = _llava_content(turn["value"])
        messages.append({"role": _ROLES[turn["from"]], "content": content})
        markers += count
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipSample("no assistant turn")
    image_paths = record.get("image") or []
    image_paths = [image_paths] if isinstance(image_paths, str) else image_paths
    if not isinstance(image_paths, list) or markers != len(image_paths):
        raise SkipSample("image marker mismatch")
    sample: dict[str, Any] = {}
    for index, relative in enumerate(image_paths):
        extension, data = read_image(_resolve(images_dir, relative))
        sample[f"{index}.{extension}"] = data
    sample["json"] = {"messages": messages, "id": record.get("id")}
    return sample


def _llava_samples(records: list, images_dir: Path) -> Iterator[tuple[str, Any]]:
    for index, record in enumerate(records):
        has_id = isinstance(record, dict) and record.get("id") is not None
        key = str(record["id"]) if has_id else str(index)
        try:
            yield key, llava_record(record, images_dir)
        except SkipSample as skip:
            yield key, skip


def convert_llava(json_path: str | os.PathLike, images: str | os.PathLike,
                  out: str | os.PathLike, *, progress: bool = True,
                  **writer_args: Any) -> WriteSummary:
    """LLaVA instruction JSON (list of {"id", "image"?, "conversations"}) -> chat shards.

    `<image>` markers become `{"type": "image"}` parts where they stand; their count must equal
    the number of images ("image" is a path or a list of paths, relative to `images`). Records
    without an image become text-only chat samples. Key: the record's id (index if absent).
    """
    records = load_json(json_path)
    if not isinstance(records, list):
        raise InputError(f"{json_path}: LLaVA JSON must be a list of records, "
                         f"got {type(records).__name__}")
    writer = ShardWriter(out, **writer_args)
    return _drain(writer, _llava_samples(records, Path(images)), total=len(records),
                  progress=progress, desc="from-llava")


# --- image folder ------------------------------------------------------------------------------

def _folder_samples(images: list[Path], root: Path) -> Iterator[tuple[str, Any]]:
    for path in images:
        key = path.relative_to(root).with_suffix("").as_posix()
        caption_path = path.with_suffix(".txt")
        try:
            if not caption_path.is_file():
                raise SkipSample("missing caption")
            try:
                text = caption_path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise SkipSample("caption not utf-8") from None
            if not text:
                raise SkipSample("empty caption")
            extension, data = read_image(path)
            yield key, {extension: data, "txt": text, "json": {"caption": text}}
        except SkipSample as skip:
            yield key, skip


def convert_folder(folder: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True,
                   **writer_args: Any) -> WriteSummary:
    """A folder tree of images with same-stem `.txt` captions -> caption shards.

    Images are found recursively (suffixes in `IMAGE_SUFFIXES`, any case) in sorted order; the
    key is the path relative to `folder` without its suffix (then sanitised).
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{folder}: not a directory")
    images = sorted(p for p in root.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    writer = ShardWriter(out, **writer_args)
    return _drain(writer, _folder_samples(images, root), total=len(images), progress=progress,
                  desc="from-folder")
