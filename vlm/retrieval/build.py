"""Build an index over the images of caption shards (`vlm index build`).

Each caption sample's image is embedded by the tower (`vlm.retrieval.embed`) and stored with its
key, its captions and its shard/member. Samples of other kinds, unreadable ones and repeated keys
are skipped and counted by reason, with the first message of each reason kept (as `vlm evaluate`
reads shards: `caption_examples`).

Resumable and atomic: each finished shard's vectors and entries are kept in `.<OUT>.partial/`
next to the index, beside the tower's fingerprint, so an interrupted build run again with the same
tower embeds only the shards not yet done; the index is then written into a temporary directory
and renamed to OUT, so OUT is always either absent, the previous index or the complete new one.
The same shards and tower give a byte-identical index.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vlm.data.examples import caption_examples
from vlm.data.features import shard_id
from vlm.errors import UserError
from vlm.export import _apply_umask, _move_into_place  # as a model directory is put in place
from vlm.features import _sample_count
from vlm.retrieval.embed import embed, tower_fingerprint
from vlm.retrieval.index import KINDS, META_FILE, Entry, Index, _entry

_FINGERPRINT = "fingerprint.json"


@dataclass
class BuildReport:
    """What one `build_index` call did."""

    path: Path
    entries: int = 0
    shards_built: int = 0
    shards_reused: int = 0  # embedded by an interrupted earlier call
    skipped: Counter = field(default_factory=Counter)  # reason -> samples
    first_errors: dict[str, str] = field(default_factory=dict)  # reason -> first message

    def summary(self) -> str:
        skips = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        reused = f" ({self.shards_reused} embedded by an interrupted build)" if self.shards_reused else ""
        return (f"indexed {self.entries} image(s) from {self.shards_built + self.shards_reused} shard(s){reused}; "
                f"skipped: {skips}")


def build_index(model: Any, shards: Sequence[str | Path], out: str | Path, *, kind: str = "flat",
                batch_size: int = 64, overwrite: bool = False, progress: bool = True,
                source: Mapping[str, Any] | None = None) -> BuildReport:
    """Embed the caption images of `shards` with `model`'s tower (a VisionLanguageModel or `Tower`)
    and write the index directory `out` (see the module docstring).

    `source`: how to rebuild the tower for queries ({"model": DIR} or {"encoder": VisionConfig
    dict}), recorded in index.json. An existing `out` is refused unless `overwrite`, and even then
    unless it is an index.
    """
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    shards = [str(Path(s).resolve()) for s in shards]
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"--data: no shard at {missing[:3] if missing else 'the given pattern'}")
    out = Path(out)
    replace = _check_target(out, overwrite=overwrite)
    expected = tower_fingerprint(model)
    partial = out.parent / f".{out.name}.partial"
    _prepare_partial(partial, expected)
    report = BuildReport(out)
    with tqdm(total=_sample_count(shards), unit="sample", desc="indexing", disable=not progress) as bar:
        for shard in shards:
            if (partial / f"{shard_id(shard)}.json").is_file():
                report.shards_reused += 1
                bar.update(json.loads((partial / f"{shard_id(shard)}.json").read_text())["samples"])
                continue
            _embed_shard(model, shard, partial, batch_size=batch_size, bar=bar)
            report.shards_built += 1
    vectors, entries = _assemble(partial, shards, report)
    meta = {"fingerprint": expected, "source": dict(source or {}), "shards": shards,
            "skipped": dict(sorted(report.skipped.items())), "first_errors": dict(sorted(report.first_errors.items())),
            "features": "vision tower output tokens, mean-pooled, L2-normalised; cosine similarity"}
    index = Index(vectors, entries, kind=kind, meta=meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        index.save(tmp)
        _apply_umask(tmp)
        _move_into_place(tmp, out, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(partial)
    report.entries = len(index)
    return report


def _check_target(out: Path, *, overwrite: bool) -> bool:
    """Whether an existing `out` is to be replaced; raises if it may not be."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out.exists()
    if not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    if not (out / META_FILE).is_file():
        raise FileExistsError(f"--out {out} is not a vlm index (no {META_FILE}); refusing to replace it even "
                              "with --overwrite")
    return True


def _prepare_partial(partial: Path, expected: dict[str, Any]) -> None:
    """Keep an interrupted build's shards if the same tower made them, else start afresh."""
    record = partial / _FINGERPRINT
    if record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(expected)):
        return
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _write_atomic(record, json.dumps(expected, sort_keys=True).encode())


def _embed_shard(model: Any, shard: str, partial: Path, *, batch_size: int, bar: tqdm) -> None:
    skipped: Counter = Counter()
    errors: dict[str, str] = {}
    entries: list[Entry] = []
    seen: set[str] = set()

    def images() -> Iterator[Image.Image]:
        for example in caption_examples([shard], skipped=skipped, errors=errors):
            bar.update(1)
            if example.key in seen:
                skipped["duplicate key"] += 1
                errors.setdefault("duplicate key", f"sample {example.key!r} appears twice in shard {shard!r}")
                continue
            seen.add(example.key)
            entries.append(Entry(example.key, tuple(example.references), shard, example.member))
            yield example.image

    vectors = embed(model, images(), batch_size=batch_size)
    bar.update(sum(skipped.values()) - skipped["duplicate key"])  # the reader's skips were not counted above
    name = shard_id(shard)
    save_file({"vectors": vectors.contiguous()}, partial / f".{name}.safetensors.tmp")
    os.replace(partial / f".{name}.safetensors.tmp", partial / f"{name}.safetensors")
    record = {"samples": len(entries) + sum(skipped.values()), "skipped": dict(skipped), "first_errors": errors,
              "entries": [{**asdict(entry), "captions": list(entry.captions)} for entry in entries]}
    _write_atomic(partial / f"{name}.json", json.dumps(record, ensure_ascii=False).encode())  # last: the shard is done


def _assemble(partial: Path, shards: Sequence[str], report: BuildReport) -> tuple[torch.Tensor, list[Entry]]:
    """All shards' vectors and entries in shard order; keys repeated across shards are skipped."""
    vectors: list[torch.Tensor] = []
    entries: list[Entry] = []
    shard_of: dict[str, str] = {}
    for shard in shards:
        name = shard_id(shard)
        record = json.loads((partial / f"{name}.json").read_text())
        report.skipped.update(record["skipped"])
        for reason, message in record["first_errors"].items():
            report.first_errors.setdefault(reason, message)
        shard_vectors = load_file(partial / f"{name}.safetensors")["vectors"]
        keep = []
        for row, fields in enumerate(record["entries"]):
            if fields["key"] in shard_of:
                report.skipped["duplicate key"] += 1
                report.first_errors.setdefault("duplicate key", f"sample {fields['key']!r} is in shards "
                                                                f"{shard_of[fields['key']]!r} and {shard!r}")
                continue
            shard_of[fields["key"]] = shard
            entries.append(_entry(fields))
            keep.append(row)
        vectors.append(shard_vectors[torch.tensor(keep, dtype=torch.long)])
    if not entries:
        first = "".join(f"; first {reason}: {message}" for reason, message in sorted(report.first_errors.items()))
        raise UserError(f"no caption samples to index in {len(shards)} shard(s) (skipped: "
                        f"{dict(sorted(report.skipped.items()))}{first})")
    return torch.cat(vectors), entries


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
