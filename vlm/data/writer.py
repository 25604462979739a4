"""Write webdataset tar shards: sanitised keys, rollover by count and bytes, atomic shard files.

A sample is a mapping `{"__key__": str, ext: value, ...}`; each `ext` becomes the tar member
`{key}.{ext}`. Values may be `bytes` (written as is), `str` (UTF-8) or a dict/list (JSON).
Shards are named `{prefix}-{index:06d}.tar` (prefix `train` by default, the name the recipes
glob). Each shard is written to `{name}.tmp` and renamed only once complete, so a crash never
leaves a half-written shard under a final name (readers glob `*.tar` and never see the `.tmp`).
The writer never splits a sample across shards. `SplitWriter` writes train and val shards side by
side, a sample's split chosen by a hash of its key.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

_KEY_CHAR = re.compile(r"[^A-Za-z0-9_-]")
_EXTENSION = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
_MAX_EXAMPLES = 3  # keys remembered per skip reason, for the summary
_RECIPE_FLAGS = {"train": "--data.train_shards", "val": "--data.val_shards"}


def sanitize_key(key: str) -> str:
    """Return a safe webdataset sample key: only `[A-Za-z0-9_/-]`, no `..`, no leading `/`.

    Backslashes count as `/`; empty, `.` and `..` path components are dropped (so
    `../etc/passwd` -> `etc/passwd`, `/abs/x` -> `abs/x`); any other character (dots included,
    since webdataset splits a member name at its first dot) becomes `_`. Distinct keys may map to
    the same result; `ShardWriter` skips such duplicates and counts them.

    Raises:
        ValueError: if nothing is left, naming the original key.
    """
    parts = str(key).replace("\\", "/").split("/")
    kept = [_KEY_CHAR.sub("_", part) for part in parts if part.strip(".") != ""]
    clean = "/".join(kept)
    if not clean:
        raise ValueError(f"sample key {key!r} is empty after sanitising")
    return clean


def _member_bytes(key: str, ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"sample {key!r}: member {ext!r} has unsupported type {type(value).__name__}")


@dataclass
class WriteSummary:
    """What a writer (or a converter through it) did: samples written, skipped by reason."""

    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few skipped keys
    shards: list[str] = field(default_factory=list)  # final shard paths, in order
    bytes_written: int = 0

    def skip(self, reason: str, key: str | None = None) -> None:
        self.skipped[reason] += 1
        if key is not None and len(self.examples.setdefault(reason, [])) < _MAX_EXAMPLES:
            self.examples[reason].append(key)

    def as_dict(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": dict(sorted(self.skipped.items())),
                "shards": [os.path.basename(s) for s in self.shards], "bytes": self.bytes_written}

    def describe(self) -> str:
        """One human-readable paragraph: written, shards, bytes, then each skip reason."""
        lines = [f"wrote {self.written} samples in {len(self.shards)} shards "
                 f"({self.bytes_written / 1e6:.1f} MB)"]
        return "\n".join(lines + self._skip_lines("samples"))

    def _skip_lines(self, unit: str) -> list[str]:
        total = sum(self.skipped.values())
        lines = [f"skipped {total} {unit}" + (":" if total else "")]
        for reason, count in sorted(self.skipped.items()):
            keys = self.examples.get(reason, [])
            hint = f" (e.g. {', '.join(keys)})" if keys else ""
            lines.append(f"  {reason}: {count}{hint}")
        return lines


class ShardWriter:
    """Write samples into `{out_dir}/{prefix}-{index:06d}.tar`, rolling over by count and bytes.

    A shard holds at most `max_count` samples and its file is at most `max_bytes` long, unless a
    single sample alone is bigger (it then gets a shard of its own). Byte sizes are exact: tar
    headers, block padding and the end-of-archive record are all counted. Tar metadata is fixed
    (mtime 0, uid 0, mode 0644), so the same samples always give byte-identical shards.

    Existing shards with the same prefix are an error unless `overwrite=True`, which deletes them
    first (so no stale shard from an earlier, longer run survives).
    """

    def __init__(self, out_dir: str | os.PathLike, *, prefix: str = "train",
                 max_count: int = 10_000, max_bytes: int = 1 << 30, overwrite: bool = False):
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"shard size (--shard-size, max_count) and shard bytes (--shard-bytes, "
                             f"max_bytes) must be >= 1, got {max_count} and {max_bytes}")
        if not prefix or sanitize_key(prefix) != prefix or "/" in prefix:
            raise ValueError(f"shard prefix {prefix!r} must be a plain name of [A-Za-z0-9_-]")
        self.out_dir = Path(out_dir)
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        self.summary = WriteSummary()
        self._keys: set[str] = set()
        self._index = 0
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0  # samples in the open shard
        self._offset = 0  # bytes in the open shard, before the end-of-archive record
        self._prepare_dir(overwrite)

    def _prepare_dir(self, overwrite: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(rf"^{re.escape(self.prefix)}-\d{{6}}\.tar(\.tmp)?$")
        existing = sorted(p for p in self.out_dir.iterdir() if pattern.match(p.name))
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds shards {self.prefix}-*.tar "
                                  f"(e.g. {existing[0].name}); pass --overwrite "
                                  "(overwrite=True in Python) to replace them")
        for path in existing:
            path.unlink()

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def skip(self, reason: str, *, key: str | None = None) -> None:
        """Count a sample the caller could not write (e.g. "missing image")."""
        self.summary.skip(reason, key)

    def write(self, sample: Mapping[str, Any]) -> bool:
        """Write one sample; return False (and count it) if its key was already written."""
        if "__key__" not in sample:
            raise ValueError(f"sample without __key__ (members: {sorted(sample)})")
        key = sanitize_key(sample["__key__"])
        if key in self._keys:
            self.skip("duplicate key", key=key)
            return False
        members = self._members(key, sample)
        size = sum(len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
                   + _padded(info.size) for info, _ in members)
        if self._tar is not None and (self._count >= self.max_count
                                      or _final_size(self._offset + size) > self.max_bytes):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        self._offset += size
        self.summary.written += 1
        return True

    def _members(self, key: str, sample: Mapping[str, Any]) -> list[tuple[tarfile.TarInfo, bytes]]:
        members = []
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue  # __key__, __url__ and friends are reader metadata, not members
            if not _EXTENSION.match(ext):
                raise ValueError(f"sample {key!r}: member extension {ext!r} must be lower-case "
                                 "[a-z0-9_] parts joined by dots")
            data = _member_bytes(key, ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            members.append((info, data))
        if not members:
            raise ValueError(f"sample {key!r} has no members to write")
        return members

    def _open_shard(self) -> None:
        tmp = self.shard_path(self._index).with_suffix(".tar.tmp")
        self._file = open(tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count, self._offset = 0, 0

    def _finish_shard(self) -> None:
        final = self.shard_path(self._index)
        self._tar.close()  # writes the end-of-archive record; leaves our file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(final.with_suffix(".tar.tmp"), final)
        self.summary.shards.append(str(final))
        self.summary.bytes_written += final.stat().st_size
        self._tar, self._file = None, None
        self._index += 1

    def _abort_shard(self) -> None:
        tmp = self.shard_path(self._index).with_suffix(".tar.tmp")
        self._tar.close()
        self._file.close()
        tmp.unlink(missing_ok=True)
        self.summary.written -= self._count  # those samples are not on disk
        self._tar, self._file = None, None

    def close(self) -> WriteSummary:
        """Finish the open shard (if any) and return the summary."""
        if self._tar is not None:
            self._finish_shard()
        return self.summary

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._abort_shard()


def split_of(group: str, val_fraction: float) -> str:
    """"val" for about `val_fraction` of all groups, "train" for the rest, by a hash of `group`:
    the same group always lands in the same split, whatever else the input holds."""
    digest = hashlib.blake2b(group.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


@dataclass
class SplitSummary(WriteSummary):
    """A `WriteSummary` over the splits of one folder, plus the samples written per split.

    Skips are counted here, not per split: a skipped sample belongs to no split.
    """

    out: str = "."
    splits: dict[str, int] = field(default_factory=dict)  # split (shard prefix) -> samples

    def shard_glob(self, split: str) -> str:
        return os.path.join(self.out, f"{split}-*.tar")

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "splits": dict(self.splits)}

    def describe(self) -> str:
        """Samples per split with the shard glob to give a recipe, then skips by reason."""
        lines = [f"wrote {self.written} samples in {len(self.shards)} shards "
                 f"({self.bytes_written / 1e6:.1f} MB) to {self.out}"]
        for split, count in self.splits.items():
            if not count:
                lines.append(f"  {split}: 0 samples, no {split}-*.tar written")
                continue
            where = shlex.quote(self.shard_glob(split))
            flag = _RECIPE_FLAGS.get(split)
            lines.append(f"  {split}: {count} samples -> {flag + ' ' if flag else ''}{where}")
        return "\n".join(lines + self._skip_lines("inputs"))


class SplitWriter:
    """Write one split (`split`-*.tar) or, with `val_fraction`, train-*.tar and val-*.tar into
    one folder, a sample going to val when `split_of(group or its key, val_fraction)` says so.

    Keys are unique over all splits (a repeated key is skipped as "duplicate key"). `summary`
    is complete once the writer is closed. `writer_args` go to each `ShardWriter`.
    """

    def __init__(self, out_dir: str | os.PathLike, *, split: str = "train",
                 val_fraction: float = 0.0, **writer_args: Any):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val fraction must be >= 0 and < 1, got {val_fraction}")
        if val_fraction and split != "train":
            raise ValueError(f"a val fraction writes both train and val shards: pass --split {split} "
                             "or --val-fraction, not both (split= or val_fraction= in Python)")
        self.val_fraction = val_fraction
        names = ("train", "val") if val_fraction else (split,)
        self.writers = {name: ShardWriter(out_dir, prefix=name, **writer_args) for name in names}
        self.summary = SplitSummary(out=str(out_dir))
        self._keys: set[str] = set()
        self._stack = contextlib.ExitStack()
        for writer in self.writers.values():
            self._stack.enter_context(writer)

    def write(self, sample: Mapping[str, Any], *, group: str | None = None) -> bool:
        """Write one sample to its split; return False (and count it) if its key was written."""
        key = sanitize_key(sample.get("__key__", ""))
        if key in self._keys:
            self.skip("duplicate key", key=key)
            return False
        self._keys.add(key)
        if not self.val_fraction:
            return self.writers[next(iter(self.writers))].write(sample)
        return self.writers[split_of(key if group is None else group, self.val_fraction)].write(sample)

    def skip(self, reason: str, *, key: str | None = None) -> None:
        """Count an input the caller could not write."""
        self.summary.skip(reason, key)

    def close(self) -> SplitSummary:
        """Finish every split's open shard and return the summary (once complete, it stays)."""
        if self.summary.splits:
            return self.summary
        self._stack.close()
        for name, writer in self.writers.items():
            self.summary.splits[name] = writer.summary.written
            self.summary.written += writer.summary.written
            self.summary.shards += writer.summary.shards
            self.summary.bytes_written += writer.summary.bytes_written
        return self.summary

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stack.__exit__(exc_type, exc, tb)


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _final_size(offset: int) -> int:
    """File size once closed: two zero blocks, then padding to a whole tar record."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
