"""Caption examples read from shards: what `vlm evaluate` scores and `vlm index build` embeds.

Samples of other kinds and unusable ones are skipped and counted by reason; the first message of
each reason is kept (naming the shard, sample and member), so a command can say why it read fewer
samples than the shards hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlm.data.decode import IMAGE_EXTENSIONS, SampleError, decode_sample, iter_shard_samples
from vlm.data.formats import sample_kind


@dataclass
class CaptionExample:
    key: str
    image: Image.Image
    references: list[str]
    member: str = "jpg"  # the image's member name in its shard (e.g. "png")
    scene: dict | None = None  # the synthetic shapes data's truth (json "scene"): hallucination is scored


def caption_examples(shards: Sequence[str | Path], *, limit: int | None = None, skipped: Counter | None = None,
                     errors: dict[str, str] | None = None) -> Iterator[CaptionExample]:
    """Caption samples of the shards, in order; other kinds and bad samples are counted in `skipped`,
    and `errors` keeps the first bad sample's message per reason."""
    skipped = skipped if skipped is not None else Counter()
    errors = errors if errors is not None else {}
    count = 0
    for shard in shards:
        with open(shard, "rb") as stream:
            for raw in iter_shard_samples(stream, str(shard), max_member_bytes=64 * 2**20):
                example = _example(raw, skipped, errors)
                if example is None:
                    continue
                yield example
                count += 1
                if limit is not None and count >= limit:
                    return


def _example(raw: dict, skipped: Counter, errors: dict[str, str]) -> CaptionExample | None:
    try:
        if "__error__" in raw:
            raise raw["__error__"]
        sample = decode_sample(raw)  # images over DEFAULT_MAX_PIXELS are refused from their header
    except SampleError as error:
        skipped[error.reason] += 1
        errors.setdefault(error.reason, str(error))
        return None
    if sample_kind(sample) != "caption":
        skipped[f"not a caption sample ({sample_kind(sample)})"] += 1
        return None
    members = [k for k in sample if k in IMAGE_EXTENSIONS]
    meta = sample.get("json") or {}
    references = meta.get("captions") or ([meta["caption"]] if "caption" in meta else []) or ([sample["txt"]] if "txt" in sample else [])
    if len(members) != 1 or not references:
        skipped["missing image or caption"] += 1
        return None
    scene = meta.get("scene") if isinstance(meta.get("scene"), dict) else None
    return CaptionExample(sample["__key__"], sample[members[0]], [r.strip() for r in references], members[0], scene)


def read_caption_examples(shards: Sequence[str | Path], *, limit: int | None = None
                          ) -> tuple[list[CaptionExample], Counter, dict[str, str]]:
    """All caption examples of the shards (at most `limit`), the skip counts and first errors;
    ValueError naming the skips when there is none."""
    skipped: Counter = Counter()
    errors: dict[str, str] = {}
    examples = list(caption_examples(shards, limit=limit, skipped=skipped, errors=errors))
    if not examples:
        first = "".join(f"; first {reason}: {message}" for reason, message in errors.items())
        raise ValueError(f"no caption samples in {[str(s) for s in shards]} (skipped: {dict(skipped)}{first})")
    return examples, skipped, errors
