"""Preference pairs (a prompt with images, a chosen and a rejected answer) -> preference shards:
`vlm data from-preference`.

The input is a JSON list of records; each record holds
- its images: "image" (a path) or "images" (a list of paths), relative to the images folder;
  neither means a text-only prompt;
- its prompt: "prompt" or "question" (a string, `<image>` markers where the images go, or a list
  of messages), or "conversations" (LLaVA: [{"from": "human"|"gpt"|"system", "value"}]) or
  "messages" (chat: [{"role", "content"}], content a string or a list of text/image parts). The
  prompt ends with a user turn. Without any of these, chosen and rejected given as message lists
  that agree up to their last assistant turn supply it (TRL's implicit prompt);
- "chosen" and "rejected": a string, or a list of messages whose last assistant turn is the
  answer (TRL's conversational layout, RLAIF-V).

A prompt with no image marker and N images gets the N image parts at the start of its first user
turn; otherwise markers and images must match in number. Text is kept as written: a user's text
that spells a special token ("<|eot_id|>") stays text, since only image parts make image slots and
the tokenizer encodes special-token text as plain text.

Output: members `0.<ext>`, `1.<ext>`, ... and json {"messages", "chosen", "rejected", "id"} (the
preference format of data/README.md). Bad records are skipped and counted by reason, as by the
other converters, or, with `handler="strict"`, stop the conversion at the first one (`InputError`
naming the record).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlm.data.convert import (_ROLES, InputError, SkipSample, _drain, _llava_content, _require_dir,
                              _require_samples, _resolve, load_json, read_image)
from vlm.data.writer import SplitSummary, sanitize_key
from vlm.text.chat import validate_messages

HANDLERS = ("skip", "strict")
PROMPT_FIELDS = ("prompt", "question", "conversations", "messages")


def _content(content: Any) -> str | list[dict]:
    """A turn's content in the chat-template format (`<image>` markers become image parts)."""
    if isinstance(content, str):
        return _llava_content(content)[0]
    if not isinstance(content, list):
        raise SkipSample("bad record")
    parts: list[dict] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":  # TRL may add "image": None or "text": None; the file names come separately
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise SkipSample("bad record")
    return parts


def _images_in(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for m in messages if not isinstance(m["content"], str) for part in m["content"])


def _messages(turns: Any) -> list[dict]:
    """LLaVA turns ({"from", "value"}) or chat messages ({"role", "content"}) -> chat messages."""
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise SkipSample("bad record")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise SkipSample("bad record")
        llava = "from" in turn
        role, content = (turn.get("from"), turn.get("value")) if llava else (turn.get("role"), turn.get("content"))
        if role not in _ROLES:
            raise SkipSample("unknown role")
        messages.append({"role": _ROLES[role], "content": _content(content)})
    return messages


def _last_assistant(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)


def _answer(value: Any) -> tuple[str, list[dict] | None]:
    """(answer text, the messages before it or None) from a string or a message list."""
    if isinstance(value, str):
        text, before = value, None
    elif isinstance(value, (list, dict)):
        messages = _messages(value)
        last = _last_assistant(messages)
        if last < 0:
            raise SkipSample("missing answer")
        if _images_in(messages[last:last + 1]):  # an <image> marker or part in the answer itself
            raise SkipSample("bad record")
        content, before = messages[last]["content"], messages[:last]
        text = content if isinstance(content, str) else "".join(part["text"] for part in content)
    else:
        raise SkipSample("missing answer")
    if not text.strip():
        raise SkipSample("missing answer")
    return text, before


def _prompt(record: dict, implicit: tuple[list[dict] | None, list[dict] | None]) -> tuple[list[dict], int]:
    """The prompt's messages (ending with a user turn) and its number of image markers/parts."""
    field = next((name for name in PROMPT_FIELDS if record.get(name) is not None), None)
    if field is None:
        if implicit[0] is None or implicit[0] != implicit[1] or not implicit[0]:
            raise SkipSample("missing prompt")
        messages = implicit[0]
    elif isinstance(record[field], str):
        messages = [{"role": "user", "content": _content(record[field])}]
    else:
        messages = _messages(record[field])
    if messages[-1]["role"] != "user":
        raise SkipSample("prompt does not end with a user turn")
    return messages, _images_in(messages)


def _place_images(messages: list[dict], markers: int, count: int) -> list[dict]:
    """Messages with `count` images: as marked, or all at the start of the first user turn."""
    if markers == count:
        return messages
    if markers:
        raise SkipSample("image marker mismatch")
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    content = messages[first]["content"]
    text = [{"type": "text", "text": content}] if isinstance(content, str) and content else []
    parts = [{"type": "image"}] * count + (text if isinstance(content, str) else list(content))
    return [*messages[:first], {"role": "user", "content": parts}, *messages[first + 1:]]


def preference_record(record: Any, images_dir: Path) -> dict:
    """One record -> preference sample members (`0.<ext>`, ..., `json`); `SkipSample` if bad."""
    if not isinstance(record, dict):
        raise SkipSample("bad record")
    if record.get("chosen") is None or record.get("rejected") is None:
        raise SkipSample("missing answer")
    (chosen, chosen_before), (rejected, rejected_before) = _answer(record["chosen"]), _answer(record["rejected"])
    if chosen == rejected:
        raise SkipSample("identical answers")
    messages, markers = _prompt(record, (chosen_before, rejected_before))
    paths = record.get("images", record.get("image")) or []
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list):
        raise SkipSample("bad image path")
    messages = _place_images(messages, markers, len(paths))
    try:
        validate_messages([*messages, {"role": "assistant", "content": chosen}])
    except ValueError:  # e.g. a system turn not first, an image marker in a system turn
        raise SkipSample("bad record") from None
    sample: dict[str, Any] = {}
    for index, relative in enumerate(paths):
        extension, data = read_image(_resolve(images_dir, relative))
        sample[f"{index}.{extension}"] = data
    sample["json"] = {"messages": messages, "chosen": chosen, "rejected": rejected, "id": record.get("id")}
    return sample


def _record_key(record: Any, index: int) -> str:
    for name in ("id", "idx"):
        if isinstance(record, dict) and record.get(name) is not None:
            return str(record[name])
    return str(index)


def _preference_samples(records: list, images_dir: Path) -> Iterator[tuple[str, str, Any]]:
    for index, record in enumerate(records):
        key = _record_key(record, index)
        try:
            yield key, key, preference_record(record, images_dir)
        except SkipSample as skip:
            yield key, key, skip


def _strict(samples: Iterable[tuple[str, str, Any]]) -> Iterator[tuple[str, str, Any]]:
    """Raise `InputError` naming the first record that would be skipped."""
    seen: set[str] = set()
    stop = "(--handler strict stops at the first bad record)"
    for key, group, sample in samples:
        if isinstance(sample, SkipSample):
            raise InputError(f"record {key!r}: {sample.reason} {stop}")
        try:
            clean = sanitize_key(key)
        except ValueError:
            raise InputError(f"record {key!r}: bad key {stop}") from None
        if clean in seen:
            raise InputError(f"record {key!r}: duplicate key {clean!r} {stop}")
        seen.add(clean)
        yield key, group, sample


def convert_preference(json_path: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                       *, split: str = "train", val_fraction: float = 0.0, handler: str = "skip",
                       progress: bool = True, **writer_args: Any) -> SplitSummary:
    """Preference JSON (a list of records, layouts in the module docstring) -> preference shards.

    Key: the record's "id" (else "idx", else its index). `split`, `val_fraction` (by key) and
    `writer_args` as in `vlm.data.convert.convert_coco`. `handler="skip"` counts bad records by
    reason; "strict" raises `InputError` at the first (shards already finished stay). Raises
    `InputError` for a bad JSON or images folder, `NoSamplesError` when no record is usable.
    """
    if handler not in HANDLERS:
        raise ValueError(f"handler must be one of {HANDLERS}, got {handler!r}")
    records = load_json(json_path)
    if not isinstance(records, list):
        raise InputError(f"{json_path}: preference JSON must be a list of records, got {type(records).__name__}")
    images_dir = _require_dir(images, "images folder")
    samples = _preference_samples(records, images_dir)
    summary = _drain(_strict(samples) if handler == "strict" else samples, out, split=split,
                     val_fraction=val_fraction, writer_args=writer_args, total=len(records),
                     progress=progress, desc="from-preference")
    return _require_samples(summary, f"{json_path}: no usable record found ({len(records)} records; looked "
                            "for 'chosen' and 'rejected' answers after a prompt ('prompt', 'question', "
                            f"'conversations' or 'messages') and 'image'/'images' files under {images_dir})")
