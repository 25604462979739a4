"""Text for tokenizer training, pulled from the text members of shards (captions, chats, documents)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

# Keys of structured members that hold annotations rather than language.
_SKIP_KEYS = {"scene", "scenes", "type", "role", "index", "image", "id", "image_id"}


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _SKIP_KEYS:
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def shard_texts(shards: Sequence[str | Path]) -> Iterator[str]:
    """Every caption / message / text segment found in the `txt` and `json` members of the shards."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                suffix = member.name.rsplit(".", 1)[-1]
                if not member.isfile() or suffix not in {"txt", "json"}:
                    continue
                data = tar.extractfile(member).read().decode("utf-8", errors="replace")
                if suffix == "txt":
                    yield data
                else:
                    try:
                        yield from _strings(json.loads(data))
                    except json.JSONDecodeError:
                        continue  # the reading pipeline reports bad samples; here they just add no text


def write_corpus(shards: Sequence[str | Path], out: str | Path) -> int:
    """Write one text per line to `out` (atomically); returns the number of lines."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    lines = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for text in shard_texts(shards):
            f.write(text.replace("\n", " ") + "\n")
            lines += 1
    tmp.replace(out)
    return lines
