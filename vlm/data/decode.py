"""Safe reading of untrusted webdataset shards: tar members grouped into samples, then decoded.

Shards come from the internet, so every byte is untrusted:
- the tar is read as a stream (nothing is extracted to disk); keys with "..", a leading "/" or
  odd characters are refused, and a shard that ends early is detected (tarfile alone would stop
  silently at a truncated header);
- images are decoded only if their bytes are JPEG, PNG or WEBP (the file extension is not trusted),
  and only after the header's width x height passed the pixel limit (`DEFAULT_MAX_PIXELS`, the one
  limit of every command), so a decompression bomb is refused before a single pixel is decoded;
- members that would need unpickling (`.pth`, `.pkl`, `.pyd`, ..., object `.npy`) are refused,
  never loaded: unpickling runs arbitrary code;
- text is strict UTF-8 and bad JSON is an error naming the sample and member.

Every refusal is a `SampleError` with a `reason` from `SKIP_REASONS`, which the pipeline's
`handler` policy either raises (strict) or counts and skips (skip).
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

# Why a sample can be refused; the pipeline counts skips per reason.
SKIP_REASONS: tuple[str, ...] = (
    "truncated shard",  # the tar ends mid-member or mid-header
    "corrupt shard",  # the tar has a header that is not a tar header
    "unsafe key",  # key with "..", a leading "/" or characters outside [A-Za-z0-9_./-]
    "duplicate member",  # the same member name twice in one sample
    "member too large",  # a member bigger than the configured byte limit
    "pickle member",  # a member that would need unpickling
    "empty member",  # a zero-byte member
    "image format",  # bytes that are not JPEG, PNG or WEBP
    "image too large",  # more pixels than the limit (decompression bomb)
    "corrupt image",  # an allowed format that fails to decode
    "bad text",  # text that is not UTF-8
    "bad json",  # JSON that does not parse
    "missing caption",  # a caption sample without a caption
    "missing image",  # a sample without the image(s) it needs
    "image mismatch",  # image parts and image members disagree
    "bad sample",  # anything else about a sample's structure
    "no cached features",  # training from a feature cache that lacks this sample's image
    "bad preference",  # a preference sample without two different answers after a user turn
)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
TEXT_EXTENSIONS = frozenset({"txt", "text"})
JSON_EXTENSIONS = frozenset({"json"})
# Loading any of these means unpickling. .npy is loaded with allow_pickle=False instead.
PICKLE_EXTENSIONS = frozenset({"pyd", "pth", "pt", "pkl", "pickle", "ckpt", "joblib"})
ARRAY_EXTENSIONS = frozenset({"npy"})
# The one image-size limit, used by the data reader, the converters, `vlm caption` and `vlm evaluate`:
# width x height above it is refused from the header, before decoding (a decompression bomb).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Header parsers without Pillow's own decompression-bomb check (Image.MAX_IMAGE_PIXELS, with its own
# wording at 179 MP), so that our limit and our message are the only ones a user meets.
_OPENERS = {"JPEG": JpegImagePlugin.jpeg_factory, "PNG": PngImagePlugin.PngImageFile,
            "WEBP": WebPImagePlugin.WebPImageFile}


class SampleError(ValueError):
    """A sample that cannot be used, with the reason and where it came from.

    `reason` is one of `SKIP_REASONS` (skips are counted under it); `key`, `url` (the shard file)
    and `member` (e.g. "0.jpg") say where. Constructible from a message alone, as DataLoader
    workers re-raise exceptions that way.
    """

    def __init__(self, message: str, *, reason: str = "bad sample", key: str | None = None,
                 url: str | None = None, member: str | None = None):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        self.message, self.reason, self.key, self.url, self.member = message, reason, key, url, member
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [f"{name} {value!r}" for name, value in
                 (("shard", self.url), ("sample", self.key), ("member", self.member)) if value is not None]
        suffix = f" ({', '.join(where)})" if where else ""
        return f"{self.reason}: {self.message}{suffix}"

    def located(self, *, key: str | None = None, url: str | None = None,
                member: str | None = None) -> SampleError:
        """A copy with the missing location fields filled in (existing ones are kept)."""
        return SampleError(self.message, reason=self.reason, key=self.key or key,
                           url=self.url or url, member=self.member or member)


def sniff_image_format(data: bytes) -> str | None:
    """PIL format name ("JPEG", "PNG", "WEBP") from the magic bytes, or None: the only formats opened."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    return "WEBP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


def check_image_size(width: int, height: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """SampleError "image too large" when width x height exceeds `max_pixels`; its message (both
    sizes and the fix) is the one every command shows, after the file's name."""
    if width * height > max_pixels:
        side = int(max_pixels ** 0.5)
        square = f" ({side}x{side})" if side * side == max_pixels else ""
        raise SampleError(f"{width}x{height} image ({width * height:,} pixels) exceeds the limit of "
                          f"{max_pixels:,} pixels{square}; downscale it", reason="image too large")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode JPEG/PNG/WEBP bytes to an RGB image, refusing bombs from the header alone.

    Transparent images are composited onto white, so a transparent background is not black.
    Raises SampleError ("empty member", "image format", "image too large", "corrupt image").
    """
    if not data:
        raise SampleError("zero-byte image", reason="empty member")
    kind = sniff_image_format(data)
    if kind is None:
        raise SampleError(f"bytes are not JPEG, PNG or WEBP (start {data[:8]!r})", reason="image format")
    try:
        image = _OPENERS[kind](io.BytesIO(data))  # lazy: reads the header only
    except Exception as error:  # any parser failure on untrusted bytes means a corrupt image
        raise SampleError(f"{kind} header does not parse: {error}", reason="corrupt image") from None
    check_image_size(*image.size, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():  # our own limit above is the one that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
        return _to_rgb(image)
    except Exception as error:
        raise SampleError(f"{kind} data does not decode: {error}", reason="corrupt image") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_text(data: bytes) -> str:
    """Strict UTF-8 (a leading BOM is dropped); SampleError "bad text" otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SampleError(f"not UTF-8: {error}", reason="bad text") from None


def decode_json(data: bytes) -> Any:
    """Parse UTF-8 JSON; SampleError "bad json" naming the parse error otherwise."""
    text = decode_text(data)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SampleError(f"invalid JSON: {error}", reason="bad json") from None


def decode_array(data: bytes) -> np.ndarray:
    """Load a .npy array without ever unpickling (object arrays are refused)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise SampleError("object array would need unpickling", reason="pickle member") from None
        raise SampleError(f"bad .npy member: {error}", reason="bad sample") from None


def member_extension(member: str) -> str:
    """The last extension of a member name: "0.jpg" -> "jpg", "json" -> "json"."""
    return member.rsplit(".", 1)[-1].lower()


def decode_member(member: str, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """Decode one member by its extension; unknown extensions stay raw (inert) bytes."""
    extension = member_extension(member)
    if extension in PICKLE_EXTENSIONS:
        raise SampleError(f".{extension} members need unpickling and are never loaded", reason="pickle member")
    if extension in IMAGE_EXTENSIONS:
        return decode_image(data, max_pixels=max_pixels)
    if extension in TEXT_EXTENSIONS:
        return decode_text(data)
    if extension in JSON_EXTENSIONS:
        return decode_json(data)
    if extension in ARRAY_EXTENSIONS:
        return decode_array(data)
    return data


def decode_sample(sample: Mapping[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode every member of a raw sample {"__key__", "__url__", member: bytes, ...}; a member
    that is not bytes (an image replaced by its cached features) is kept as it is.

    Pickle-needing members are checked first, so such a sample is refused before any image work.
    Errors are SampleErrors that name the shard, the key and the member.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    members = sorted((name for name in sample if not name.startswith("__")),
                     key=lambda name: member_extension(name) not in PICKLE_EXTENSIONS)  # pickles first
    decoded = {name: value for name, value in sample.items() if name.startswith("__")}
    for name in members:
        if not isinstance(sample[name], (bytes, bytearray, memoryview)):  # decoded already (cached features)
            decoded[name] = sample[name]
            continue
        try:
            decoded[name] = decode_member(name, sample[name], max_pixels=max_pixels)
        except SampleError as error:
            raise error.located(key=key, url=url, member=name) from None
    return decoded


# --- reading tar shards -----------------------------------------------------------------------

_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")


def iter_shard_samples(stream: BinaryIO, url: str, *, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    """Raw samples {"__key__", "__url__", member: bytes, ...} of one tar stream, in order.

    Members are grouped by key, the name up to the first dot of its last path component
    ("dir/00042.0.jpg" -> key "dir/00042", member "0.jpg"). A sample that cannot be used is still
    yielded, with "__error__": SampleError, so the caller's policy decides and counts: unsafe key,
    duplicate or oversized member, or the shard breaking (truncated / corrupt) while it was read.
    """
    current: dict[str, Any] | None = None
    try:
        for name, data in _tar_members(stream, max_member_bytes):
            key, member = split_member_name(name)
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
                if not _is_safe_key(key):
                    current["__error__"] = SampleError(
                        "keys must not contain '..' or start with '/', and use only [A-Za-z0-9_./-]",
                        reason="unsafe key", key=key, url=url)
            if "__error__" in current or not member:
                continue
            if isinstance(data, SampleError):
                current["__error__"] = data.located(key=key, url=url, member=member)
            elif member in current:
                current["__error__"] = SampleError("member appears twice", reason="duplicate member",
                                                   key=key, url=url, member=member)
            else:
                current[member] = data
    except _BrokenShard as broken:  # the sample being read when the shard broke is lost
        key = current["__key__"] if current is not None else None
        if broken.member_name is not None and split_member_name(broken.member_name)[0] != key:
            if current is not None:
                yield current  # complete: the break is in the first member of the next sample
            key = split_member_name(broken.member_name)[0]
        yield {"__key__": key, "__url__": url, "__error__": broken.error.located(key=key, url=url)}
        return
    if current is not None:
        yield current


class _BrokenShard(Exception):
    """The tar stream cannot go on; carries the SampleError to report and, if the break came while
    reading a member's data, that member's name."""

    def __init__(self, error: SampleError, member_name: str | None = None):
        super().__init__(str(error))
        self.error, self.member_name = error, member_name


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers which header error ended the archive: tarfile stops silently at a truncated header."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as error:
            archive.vlm_end = error
            raise


def _tar_members(stream: BinaryIO, max_member_bytes: int) -> Iterator[tuple[str, bytes | SampleError]]:
    """(name, bytes) of the regular members in order; an oversized member comes with an error.

    Raises _BrokenShard ("truncated shard" / "corrupt shard") when the stream fails or the archive
    does not end with its end-of-archive block.
    """
    name = None  # the member whose data is being read, if any
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo)
        for info in archive:
            if not info.isreg():  # directories, links, devices: never followed
                continue
            name = info.name[2:] if info.name.startswith("./") else info.name
            if info.size > max_member_bytes:
                yield name, SampleError(f"{info.size} bytes > max_member_bytes {max_member_bytes}",
                                        reason="member too large")
            else:
                yield name, archive.extractfile(info).read()
            name = None
            archive.members = []  # stream mode keeps every header otherwise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        # tarfile says "unexpected end of data", "empty file" or "truncated header" when bytes run out
        truncated = isinstance(error, EOFError) or any(s in str(error) for s in ("end of data", "empty", "truncated"))
        reason = "truncated shard" if truncated else "corrupt shard"
        raise _BrokenShard(SampleError(f"tar read failed: {error}", reason=reason), name) from None
    end = getattr(archive, "vlm_end", None)
    if isinstance(end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        raise _BrokenShard(SampleError("the tar ends without its end-of-archive block", reason="truncated shard"))
    if not isinstance(end, tarfile.EOFHeaderError):
        raise _BrokenShard(SampleError(f"invalid tar header ({end})", reason="corrupt shard"))


def split_member_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, member = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), member.lower()


def _is_safe_key(key: str) -> bool:
    return bool(key) and ".." not in key and not key.startswith("/") and set(key) <= _KEY_CHARS
