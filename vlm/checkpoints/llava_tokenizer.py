"""A llava-hf directory's tokenizer as one vlm reads: vlm's special-token names and its chat header tokens.

LLaVA-1.5's tokenizer is Llama 2's (``<s>``, ``</s>``, ``<image>``, ``<pad>``), and its prompt format
"USER: <image>\n... ASSISTANT:"; vlm's chat template is Llama 3's, with header tokens. ``vlm_tokenizer``
renames the special tokens (their ids, so their embedding rows, are kept) and adds the header tokens on
free rows of the padded embedding table, which fine-tuning then teaches the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm.checkpoints.common import _read_json
from vlm.errors import UserError
from vlm.text.tokenizer import BOS, END_HEADER, EOS, EOT, IMAGE, PAD, START_HEADER, Tokenizer


_ROLE_TOKENS = (START_HEADER, END_HEADER, EOT)  # vlm's chat template needs them; LLaVA-1.5's tokenizer has none


def vlm_tokenizer(path: str | Path, out: str | Path, *, embedding_rows: int) -> Tokenizer:
    """A tokenizer.json vlm reads, written to ``out`` from a llava-hf directory's tokenizer.

    Its BOS, EOS, pad and image tokens take vlm's names with their ids kept (so they keep their
    embedding rows: the image token stays ``image_token_index``); the chat header tokens vlm's template
    needs are added on the next free ids, which must be below ``embedding_rows`` (LLaVA-1.5 pads its
    table to 32064); the post-processor, which adds BOS by its old name, is dropped (vlm's template writes
    BOS). A tokenizer that already has vlm's tokens keeps them (only its post-processor goes)."""
    path, out = Path(path), Path(out)
    data = _read_json(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    if not isinstance(data, dict) or "added_tokens" not in data:
        raise UserError(f"{path}: no tokenizer.json (a fast tokenizer) to convert")
    settings = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    processor = _read_json(path / "processor_config.json") if (path / "processor_config.json").is_file() else {}
    renames = {_token_text(settings.get("bos_token")): BOS, _token_text(settings.get("eos_token")): EOS,
               _token_text(settings.get("pad_token")): PAD, processor.get("image_token", "<image>"): IMAGE}
    present = {entry["content"] for entry in data["added_tokens"]}
    for old, new in renames.items():
        if old and old != new and old in present and new not in present:
            _rename(data, old, new)
    data["post_processor"] = None
    next_id = 1 + max([entry["id"] for entry in data["added_tokens"]] + list(_vocab_ids(data)))
    present = {entry["content"] for entry in data["added_tokens"]}
    for token in (t for t in _ROLE_TOKENS if t not in present):
        data["added_tokens"].append({"id": next_id, "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
        next_id += 1
    if next_id > embedding_rows:
        raise UserError(f"{path}: vlm's chat tokens would take ids up to {next_id - 1}, past the model's "
                        f"{embedding_rows} embedding rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, ensure_ascii=False))
    return Tokenizer.from_file(out, extra_special_tokens=())


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _rename(data: dict[str, Any], old: str, new: str) -> None:
    for entry in data["added_tokens"]:
        if entry["content"] == old:
            entry["content"], entry["special"] = new, True
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for item in vocab:
            if item[0] == old:
                item[0] = new


def _vocab_ids(data: dict[str, Any]) -> list[int]:
    vocab = data.get("model", {}).get("vocab")
    return list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))


def check_tokenizer_file(file: Path, *, image_id: int) -> None:
    """UserError unless ``file`` is a tokenizer vlm reads whose ``<|image|>`` is ``image_id``."""
    try:
        found = Tokenizer.from_file(file, extra_special_tokens=()).image_id
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise UserError(f"{file} is not a tokenizer vlm reads ({error}); add --tokenizer-out FILE to write a "
                        "converted one") from None
    if found != image_id:
        raise UserError(f"{file}: <|image|> is token {found}, not the model's image token {image_id}")

