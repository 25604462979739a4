"""Convert real corpora to shards: COCO captions, LLaVA instruction JSON, image folders.

Every converter streams its input into a `SplitWriter`, shows a progress bar, and returns its
`SplitSummary`: samples written per split, inputs skipped by reason ("missing image",
"unreadable image (permission denied)", ...). A bad sample never stops a conversion; a bad input
as a whole (unreadable JSON, wrong top-level structure, no usable sample at all) does, with an
`InputError` naming the input.

Shards are named `{split}-{index:06d}.tar`, the names the recipes expect: `split="train"`
(default) or `"val"` writes one split; `val_fraction=F` writes both, sending a sample to val when
a hash of its key (COCO: of its image, so the captions of one image stay together) falls below F.
The same input therefore always splits the same way, on every run and machine.

Images are copied byte for byte when their content is JPEG, PNG or WebP (the extension follows
the content, not the file name); other formats are re-encoded to PNG. Every image is fully
decoded once, so a corrupt one is skipped here rather than at training time.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from vlm.data.decode import DEFAULT_MAX_PIXELS
from vlm.data.writer import SplitSummary, SplitWriter, sanitize_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_COPY_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: camera JPEG
_MARKER = re.compile(r"\n*<image>\n*")  # LLaVA's placeholder, with the newlines around it
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}
_OS_REASONS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EIO: "I/O error"}


class InputError(ValueError):
    """An input is unreadable or malformed as a whole; the message names it."""


class NoSamplesError(InputError):
    """Not one usable sample in the input; `summary` holds what was skipped, by reason."""

    def __init__(self, message: str, summary: "SplitSummary"):
        super().__init__(message)
        self.summary = summary


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
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read JSON from {path}: {err}") from err


def _unreadable(what: str, err: OSError) -> str:
    return f"unreadable {what} ({_OS_REASONS.get(err.errno, err.strerror or type(err).__name__)})"


def _read_file(path: str | os.PathLike, what: str = "image") -> bytes:
    """The bytes of an image or caption file, or `SkipSample` naming why they cannot be read:
    "missing {what}", "broken {what} symlink", "{what} not a regular file" (a folder, a FIFO:
    never opened, since reading a FIFO would block), "unreadable {what} (permission denied)",
    "unreadable {what} (I/O error)"."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise SkipSample(f"broken {what} symlink" if os.path.islink(path) else f"missing {what}") from None
    except OSError as err:  # e.g. a symlink loop, a folder we may not enter
        raise SkipSample(_unreadable(what, err)) from None
    if not stat.S_ISREG(mode):
        raise SkipSample(f"{what} not a regular file")
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SkipSample(_unreadable(what, err)) from None


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[str, bytes]:
    """Return `(extension, bytes)` for an image file, verified by a full decode.

    Raises `SkipSample` with reason "corrupt image", "image too large" (more than `max_pixels`,
    default `DEFAULT_MAX_PIXELS`, the limit of every command, checked before decoding) or one of `_read_file`'s.
    """
    data = _read_file(path, "image")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
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
    """`images_dir / relative`, refusing non-strings and paths that leave `images_dir`.

    The check is on the path as written (`..`, absolute paths): symlinks the user placed inside
    `images_dir` are followed wherever they point.
    """
    if not isinstance(relative, str) or not relative:
        raise SkipSample("bad image path")
    path = Path(os.path.abspath(images_dir / relative))
    if not path.is_relative_to(os.path.abspath(images_dir)):
        raise SkipSample("image path outside images dir")
    return path


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{what} {path}: " + ("not a folder" if path.exists() else "no such folder"))
    return path


def _drain(samples: Iterable[tuple[str, str, Any]], out: str | os.PathLike, *, split: str,
           val_fraction: float, writer_args: dict[str, Any], total: int, progress: bool,
           desc: str) -> SplitSummary:
    """Write `(key, split group, sample-or-SkipSample)` triples with a progress bar."""
    writer_args = dict(writer_args)
    if "prefix" in writer_args:  # the old name of `split`, kept working for one split
        if val_fraction:
            raise ValueError("a val fraction writes train-*.tar and val-*.tar: give no prefix")
        split = writer_args.pop("prefix")
    with SplitWriter(out, split=split, val_fraction=val_fraction, **writer_args) as writer:
        for raw_key, group, sample in tqdm(samples, total=total, unit="sample", desc=desc,
                                           disable=not progress):
            if isinstance(sample, SkipSample):
                writer.skip(sample.reason, key=raw_key)
                continue
            try:
                key = sanitize_key(raw_key)
            except ValueError:
                writer.skip("bad key", key=raw_key)
                continue
            writer.write({"__key__": key, **sample}, group=group)
    return writer.summary


def _require_samples(summary: SplitSummary, looked_for: str) -> SplitSummary:
    """Raise `NoSamplesError` (message: what was looked for, skips by reason) if none was written."""
    if summary.written:
        return summary
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(summary.skipped.items()))
    raise NoSamplesError(looked_for + (f"; skipped: {skipped}" if skipped else ""), summary)


# --- COCO --------------------------------------------------------------------------------------

def _coco_samples(data: dict, images_dir: Path, per: str) -> Iterator[tuple[str, str, Any]]:
    captions: dict[Any, list[tuple[Any, str]]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann.get("image_id"), []).append((ann.get("id"), ann.get("caption")))
    known = {image.get("id") for image in data["images"]}
    for image_id in [i for i in captions if i not in known]:  # annotation order: deterministic
        for ann_id, _ in captions[image_id]:
            yield f"{image_id}_{ann_id}", "", SkipSample("unknown image id")
    for image in data["images"]:
        stem = Path(str(image.get("file_name", image.get("id")))).stem  # the split group
        texts = []
        for ann_id, text in captions.get(image.get("id"), []):
            if isinstance(text, str) and text.strip():
                texts.append((ann_id, text.strip()))
            else:
                yield f"{stem}_{ann_id}", stem, SkipSample("empty caption")
        if not texts:
            yield stem, stem, SkipSample("no caption")
            continue
        try:
            extension, data_bytes = read_image(_resolve(images_dir, image.get("file_name")))
        except SkipSample as skip:
            keys = [stem] if per == "image" else [f"{stem}_{i}" for i, _ in texts]
            yield from ((key, stem, skip) for key in keys)
            continue
        if per == "image":
            meta = {"caption": texts[0][1], "captions": [c for _, c in texts], "image_id": image["id"]}
            yield stem, stem, {extension: data_bytes, "txt": texts[0][1], "json": meta}
        else:
            for ann_id, text in texts:
                meta = {"caption": text, "image_id": image["id"], "id": ann_id}
                yield f"{stem}_{ann_id}", stem, {extension: data_bytes, "txt": text, "json": meta}


def convert_coco(captions: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                 *, per: str = "caption", split: str = "train", val_fraction: float = 0.0,
                 progress: bool = True, **writer_args: Any) -> SplitSummary:
    """COCO captions JSON -> caption shards, one sample per caption or per image.

    Keys: `{file stem}_{annotation id}` (per caption) or `{file stem}` (per image, json holds
    `"captions"`: all of them, `"caption"`: the first). `split` names the shards
    (`{split}-*.tar`); `val_fraction` splits by image instead. `writer_args` (`max_count`,
    `max_bytes`, `overwrite`) go to `ShardWriter`. Raises `InputError` for a bad JSON or images
    folder, `NoSamplesError` when no caption has a readable image.
    """
    if per not in ("caption", "image"):
        raise ValueError(f"per must be 'caption' or 'image', got {per!r}")
    data = load_json(captions)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)
            and all(isinstance(x, dict) for x in data["images"] + data["annotations"])):
        raise InputError(f"{captions}: not COCO captions JSON (needs 'images' and 'annotations' lists)")
    images_dir = _require_dir(images, "images folder")
    total = len(data["annotations"]) if per == "caption" else len(data["images"])
    summary = _drain(_coco_samples(data, images_dir, per), out, split=split,
                     val_fraction=val_fraction, writer_args=writer_args, total=total,
                     progress=progress, desc="from-coco")
    return _require_samples(summary, f"{captions}: no caption with a readable image found "
                            f"({len(data['annotations'])} annotations, {len(data['images'])} "
                            f"images listed, image files looked up in {images_dir})")


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


def _llava_samples(records: list, images_dir: Path) -> Iterator[tuple[str, str, Any]]:
    for index, record in enumerate(records):
        has_id = isinstance(record, dict) and record.get("id") is not None
        key = str(record["id"]) if has_id else str(index)
        try:
            yield key, key, llava_record(record, images_dir)
        except SkipSample as skip:
            yield key, key, skip


def convert_llava(json_path: str | os.PathLike, images: str | os.PathLike,
                  out: str | os.PathLike, *, split: str = "train", val_fraction: float = 0.0,
                  progress: bool = True, **writer_args: Any) -> SplitSummary:
    """LLaVA instruction JSON (list of {"id", "image"?, "conversations"}) -> chat shards.

    `<image>` markers become `{"type": "image"}` parts where they stand; their count must equal
    the number of images ("image" is a path or a list of paths, relative to `images`). Records
    without an image become text-only chat samples. Key: the record's id (index if absent).
    `split`, `val_fraction` (by key) and `writer_args` as in `convert_coco`.
    """
    records = load_json(json_path)
    if not isinstance(records, list):
        raise InputError(f"{json_path}: LLaVA JSON must be a list of records, "
                         f"got {type(records).__name__}")
    images_dir = _require_dir(images, "images folder")
    summary = _drain(_llava_samples(records, images_dir), out, split=split,
                     val_fraction=val_fraction, writer_args=writer_args, total=len(records),
                     progress=progress, desc="from-llava")
    return _require_samples(summary, f"{json_path}: no usable record found ({len(records)} "
                            "records; looked for 'conversations' with an assistant turn and "
                            f"'image' files under {images_dir})")


# --- image folder ------------------------------------------------------------------------------

def _folder_inputs(root: Path) -> tuple[list[Path], list[tuple[str, SkipSample]]]:
    """Images under `root` (sorted), and every other entry that is not their caption, with why
    it is dropped: a caption without an image, another kind of file, a symlinked folder."""
    entries = sorted(root.rglob("*"))  # rglob does not descend into symlinked folders
    folders = {p for p in entries if p.is_dir()}
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p not in folders]
    stems = {p.with_suffix("") for p in images}
    dropped = []
    for path in entries:
        name = path.relative_to(root).as_posix()
        if path in folders:
            if path.is_symlink():
                dropped.append((name, SkipSample("symlinked folder (not followed)")))
        elif path.suffix == ".txt":
            if path.with_suffix("") not in stems:
                dropped.append((name, SkipSample("caption without image")))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            dropped.append((name, SkipSample("not an image or caption")))
    return images, dropped


def _read_caption(path: Path) -> str:
    try:
        text = _read_file(path, "caption").decode("utf-8-sig").strip()  # -sig: drop a BOM
    except UnicodeDecodeError:
        raise SkipSample("caption not utf-8") from None
    if not text:
        raise SkipSample("empty caption")
    return text


def _folder_samples(images: list[Path], dropped: list[tuple[str, SkipSample]],
                    root: Path) -> Iterator[tuple[str, str, Any]]:
    for name, skip in dropped:
        yield name, name, skip
    for path in images:
        key = path.relative_to(root).with_suffix("").as_posix()
        try:
            text = _read_caption(path.with_suffix(".txt"))
            extension, data = read_image(path)
            yield key, key, {extension: data, "txt": text, "json": {"caption": text}}
        except SkipSample as skip:
            yield key, key, skip


def convert_folder(folder: str | os.PathLike, out: str | os.PathLike, *, split: str = "train",
                   val_fraction: float = 0.0, progress: bool = True,
                   **writer_args: Any) -> SplitSummary:
    """A folder tree of images with same-stem `.txt` captions -> caption shards.

    Images are found recursively (suffixes in `IMAGE_SUFFIXES`, any case) in sorted order; the
    key is the path relative to `folder` without its suffix (then sanitised). Every other file
    (a caption without an image, a README) is counted as skipped. `split`, `val_fraction` (by
    key) and `writer_args` as in `convert_coco`.
    """
    root = _require_dir(folder, "image folder")
    images, dropped = _folder_inputs(root)
    patterns = "|".join(f"*{suffix}" for suffix in IMAGE_SUFFIXES)
    looked_for = f"{folder}: no image with a caption file ({patterns} + same-name .txt) found"
    if not images:  # fail before creating --out
        summary = SplitSummary(out=str(out))
        for name, skip in dropped:
            summary.skip(skip.reason, name)
        _require_samples(summary, looked_for)
    summary = _drain(_folder_samples(images, dropped, root), out, split=split,
                     val_fraction=val_fraction, writer_args=writer_args,
                     total=len(images) + len(dropped), progress=progress, desc="from-folder")
    return _require_samples(summary, looked_for)
