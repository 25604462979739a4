"""Llama 3 chat layout with training labels.

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>   (once per message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                    (add_generation_prompt)

Content is a string or a list of parts `{"type": "text", "text": str}` / `{"type": "image"}`; each
image part becomes one `<|image|>` token (the collator expands it later). Text is encoded
verbatim, never stripped, and text spelling "<|image|>" or "<image>" stays text: only image parts
make image slots. Labels are IGNORE_INDEX except on assistant content and its closing <|eot_id|>.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlm.text.tokenizer import END_HEADER, START_HEADER, Tokenizer

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = {"role", "content"}
_PART_KEYS = {"text": {"type", "text"}, "image": {"type"}}


class ChatTemplate:
    """Renders conversations into token ids and labels for one tokenizer.

    Args:
        tokenizer: provides the special ids and encodes the text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        start, end = tokenizer.special_id(START_HEADER), tokenizer.special_id(END_HEADER)
        blank_line = tokenizer.encode("\n\n")
        # Headers are the same for every message, so encode them once.
        self._headers = {role: [start, *tokenizer.encode(role), end, *blank_line] for role in ROLES}

    def render(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation, both of length T.

        With `add_generation_prompt=False` (training) the conversation needs an assistant turn;
        with True (generation) it must not end with one, and an assistant header is appended.
        Raises ValueError naming the message index and the problem for malformed input.
        """
        validate_messages(messages, add_generation_prompt=add_generation_prompt)
        input_ids, labels = [self.tokenizer.bos_id], [IGNORE_INDEX]
        for message in messages:
            header = self._headers[message["role"]]
            body = [*self._content_ids(message["content"]), self.tokenizer.eot_id]
            input_ids += header + body
            learned = message["role"] == "assistant"
            labels += [IGNORE_INDEX] * len(header) + (body if learned else [IGNORE_INDEX] * len(body))
        if add_generation_prompt:
            header = self._headers["assistant"]
            input_ids += header
            labels += [IGNORE_INDEX] * len(header)
        return input_ids, labels

    def _content_ids(self, content: str | Sequence[Mapping[str, Any]]) -> list[int]:
        if isinstance(content, str):
            return self.tokenizer.encode(content)
        ids: list[int] = []
        for part in content:
            if part["type"] == "image":
                ids.append(self.tokenizer.image_id)
            else:
                ids += self.tokenizer.encode(part["text"])
        return ids


def validate_messages(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> None:
    """Raise ValueError, naming the message index, if `messages` cannot be rendered."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("conversation is empty: no messages")
    for index, message in enumerate(messages):
        _check_message(index, message)
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ValueError(
            f"message {len(messages) - 1}: the last message is an assistant turn, but "
            "add_generation_prompt=True asks for a new one; drop the last message or the flag"
        )
    if not add_generation_prompt and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant message, so nothing would be learned")


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    """Number of image parts in a conversation (the images it needs, in order of appearance)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    count = 0
    for index, message in enumerate(messages):
        _check_message(index, message)
        if not isinstance(message["content"], str):
            count += sum(part["type"] == "image" for part in message["content"])
    return count


def _check_message(index: int, message: Any) -> None:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index}: expected a dict with role and content, got {type(message).__name__}")
    keys = set(message)
    if keys != _MESSAGE_KEYS:
        problems = [f"missing keys {sorted(_MESSAGE_KEYS - keys)}"] if _MESSAGE_KEYS - keys else []
        problems += [f"unknown keys {sorted(map(str, keys - _MESSAGE_KEYS))}"] if keys - _MESSAGE_KEYS else []
        raise ValueError(f"message {index}: {' and '.join(problems)}; a message has exactly role and content")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"message {index}: unknown role {role!r}; expected one of {list(ROLES)}")
    if role == "system" and index != 0:
        raise ValueError(f"message {index}: a system message must be the first message")
    if isinstance(content, str):
        return
    if not isinstance(content, Sequence) or isinstance(content, (bytes, Mapping)):
        raise ValueError(
            f"message {index}: content must be a str or a list of parts, got {type(content).__name__}"
        )
    for part_index, part in enumerate(content):
        _check_part(index, part_index, part, role)


def _check_part(index: int, part_index: int, part: Any, role: str) -> None:
    where = f"message {index}, part {part_index}"
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: expected a dict with a type, got {type(part).__name__}")
    kind = part.get("type")
    if not isinstance(kind, str) or kind not in _PART_KEYS:
        raise ValueError(f"{where}: unknown part type {kind!r}; expected 'text' or 'image'")
    expected = _PART_KEYS[kind]
    if set(part) != expected:
        raise ValueError(f"{where}: a {kind} part has keys {sorted(map(str, part))}, expected {sorted(expected)}")
    if kind == "text" and not isinstance(part["text"], str):
        raise ValueError(f"{where}: text must be a str, got {type(part['text']).__name__}")
    if kind == "image" and role != "user":
        raise ValueError(f"{where}: image parts are only allowed in user messages, not {role}")
