"""One function from a decoded sample of any kind (caption, chat, interleaved, preference) to token
ids, labels and images, using the chat template and the vision encoder's transform.

Kinds (data/README.md; a sample's kind is read from its json member):
- caption:     one image member (jpg|jpeg|png|webp) and a `txt` caption or json {"caption": str};
               rendered as a chat: user [image] -> assistant caption.
- chat:        json {"messages": [...]} in the chat-template format; images `0.jpg`, `1.png`, ...
               in the order the image parts appear.
- interleaved: json {"segments": [{"type": "text", "text": str} | {"type": "image", "index": int}]};
               <|begin_of_text|> + segments + <|end_of_text|>, every text token and the
               <|end_of_text|> learned, <|begin_of_text|> and image tokens not.
- preference:  json {"messages": [... up to the last user turn], "chosen": str, "rejected": str};
               images as for chat. Encoded as an `EncodedPreference`: the prompt + each answer as an
               assistant turn, only that answer (and its <|eot_id|>) learned.
Each image becomes ONE <|image|> token here; the collator expands it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlm.data.decode import IMAGE_EXTENSIONS, SampleError
from vlm.text.chat import IGNORE_INDEX, ChatTemplate, count_images

SAMPLE_KINDS = ("caption", "chat", "interleaved", "preference")
_INDEXED_IMAGE = re.compile(r"^(\d+)\.([a-z]+)$")


@dataclass
class EncodedSample:
    """One sample ready for the collator.

    Attributes:
        key: the sample's `__key__`, for error messages.
        input_ids: T token ids, one <|image|> per image.
        labels: T labels, IGNORE_INDEX (-100) where nothing is learned.
        images: the images in order of appearance: PIL images, or [3, H, W] tensors once transformed.
    """

    key: str
    input_ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)


@dataclass
class EncodedPreference:
    """One preference pair ready for the collator: a prompt and two answers to it.

    Both sequences are the same rendered prompt followed by one answer as an assistant turn, so they
    share their first tokens (images included) exactly and differ only after them.

    Attributes:
        key: the sample's `__key__`, for error messages.
        chosen_ids, chosen_labels: prompt + preferred answer; labels IGNORE_INDEX except on the
            answer's tokens and its closing <|eot_id|>.
        rejected_ids, rejected_labels: the same prompt + the dispreferred answer, labelled likewise.
        images: the prompt's images in order of appearance, once for the pair (PIL images, or
            [3, H, W] tensors once transformed).
    """

    key: str
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    images: list[Any] = field(default_factory=list)


def sample_kind(sample: Mapping[str, Any]) -> str:
    """"preference" if the json member has "chosen" or "rejected" (a sample with only one of them is
    a bad preference sample, not a chat), "chat" if it has "messages", "interleaved" if it has
    "segments", else "caption"."""
    meta = sample.get("json")
    if isinstance(meta, Mapping):
        if "chosen" in meta or "rejected" in meta:
            return "preference"
        if "messages" in meta:
            return "chat"
        if "segments" in meta:
            return "interleaved"
    return "caption"


def encode_sample(
    sample: Mapping[str, Any],
    template: ChatTemplate,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
) -> EncodedSample | EncodedPreference:
    """Token ids, labels and images of a decoded sample (see `vlm.data.decode.decode_sample`);
    an `EncodedPreference` for a preference sample, an `EncodedSample` for every other kind.

    Args:
        sample: {"__key__": str, member: decoded value, ...}.
        template: the chat template; its tokenizer encodes the text.
        transform: the vision encoder's transform (PIL image -> [3, H, W] tensor); None keeps PIL.
    Raises SampleError naming the key: "missing caption", "missing image", "image mismatch",
    "bad preference", "bad sample".
    """
    key = str(sample.get("__key__", "<no key>"))
    kind = sample_kind(sample)
    try:
        if kind == "preference":
            pair, images = _encode_preference(sample, template)
        elif kind == "chat":
            input_ids, labels, images = _encode_chat(sample, template)
        elif kind == "interleaved":
            input_ids, labels, images = _encode_interleaved(sample, template)
        else:
            input_ids, labels, images = _encode_caption(sample, template)
    except SampleError as error:
        raise error.located(key=key, url=sample.get("__url__")) from None
    except (ValueError, TypeError, KeyError) as error:  # malformed messages / segments
        raise SampleError(f"{kind} sample does not render: {error}", reason="bad sample",
                          key=key, url=sample.get("__url__")) from None
    if transform is not None:
        images = [transform(image) for image in images]
    if kind == "preference":
        return EncodedPreference(key, *pair, images=images)
    return EncodedSample(key=key, input_ids=input_ids, labels=labels, images=images)


def _encode_caption(sample: Mapping[str, Any], template: ChatTemplate) -> tuple[list[int], list[int], list]:
    plain = [name for name in sample if name in IMAGE_EXTENSIONS]
    if len(plain) != 1:
        found = plain or "none"
        raise SampleError(f"a caption sample needs exactly one image member (jpg|jpeg|png|webp), found {found}",
                          reason="missing image" if not plain else "image mismatch")
    caption = sample.get("txt")
    if caption is None and isinstance(sample.get("json"), Mapping):
        caption = sample["json"].get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError("no caption: expected a non-empty txt member or json {\"caption\": str}",
                          reason="missing caption")
    messages = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": caption}]
    input_ids, labels = template.render(messages)
    return input_ids, labels, [sample[plain[0]]]


def _encode_chat(sample: Mapping[str, Any], template: ChatTemplate) -> tuple[list[int], list[int], list]:
    messages = sample["json"]["messages"]
    images = indexed_images(sample)
    needed = count_images(messages)
    if needed != len(images):
        raise SampleError(f"the messages have {needed} image part(s) but the sample has {len(images)} "
                          "image member(s) 0.<ext>, 1.<ext>, ...", reason="image mismatch")
    input_ids, labels = template.render(messages)
    return input_ids, labels, images


def _encode_preference(sample: Mapping[str, Any], template: ChatTemplate) -> tuple[tuple[list[int], ...], list]:
    """((chosen ids, chosen labels, rejected ids, rejected labels), images); labels only on the answer."""
    meta = sample["json"]
    messages, answers = meta.get("messages"), (meta.get("chosen"), meta.get("rejected"))
    for name, answer in zip(("chosen", "rejected"), answers):
        if not isinstance(answer, str) or not answer.strip():
            raise SampleError(f"{name} must be a non-empty string, got {answer!r:.60}", reason="bad preference")
    if answers[0] == answers[1]:
        raise SampleError("chosen and rejected are the same answer", reason="bad preference")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], Mapping) \
            or messages[-1].get("role") != "user":
        raise SampleError("messages must be a non-empty list ending with a user turn (the prompt)",
                          reason="bad preference")
    images = indexed_images(sample)
    needed = count_images(messages)
    if needed != len(images):
        raise SampleError(f"the messages have {needed} image part(s) but the sample has {len(images)} "
                          "image member(s) 0.<ext>, 1.<ext>, ...", reason="image mismatch")
    prompt, _ = template.render(messages, add_generation_prompt=True)
    pair = []
    for answer in answers:
        ids, labels = template.render([*messages, {"role": "assistant", "content": answer}])
        assert ids[: len(prompt)] == prompt  # the template renders message by message
        pair += [ids, [IGNORE_INDEX] * len(prompt) + labels[len(prompt):]]  # earlier assistant turns not learned
    return tuple(pair), images


def _encode_interleaved(sample: Mapping[str, Any], template: ChatTemplate) -> tuple[list[int], list[int], list]:
    segments = sample["json"]["segments"]
    if not isinstance(segments, list) or not segments:
        raise SampleError("segments must be a non-empty list", reason="bad sample")
    available = indexed_images(sample)
    tokenizer = template.tokenizer
    input_ids, labels, images, used = [tokenizer.bos_id], [IGNORE_INDEX], [], set()
    for position, segment in enumerate(segments):
        kind = segment.get("type") if isinstance(segment, Mapping) else None
        if kind == "text" and isinstance(segment.get("text"), str):
            ids = tokenizer.encode(segment["text"])
            input_ids += ids
            labels += ids
        elif kind == "image" and type(segment.get("index")) is int:
            index = segment["index"]
            if not 0 <= index < len(available):
                raise SampleError(f"segment {position} refers to image {index}, but the sample has "
                                  f"{len(available)} image member(s)", reason="image mismatch")
            input_ids.append(tokenizer.image_id)
            labels.append(IGNORE_INDEX)
            images.append(available[index])
            used.add(index)
        else:
            raise SampleError(f"segment {position} is not {{type: text, text: str}} or "
                              f"{{type: image, index: int}}: {segment!r:.80}", reason="bad sample")
    if len(used) != len(available):
        unused = sorted(set(range(len(available))) - used)
        raise SampleError(f"image member(s) {unused} are not referenced by any segment", reason="image mismatch")
    input_ids.append(tokenizer.eos_id)
    labels.append(tokenizer.eos_id)
    return input_ids, labels, images


def indexed_images(sample: Mapping[str, Any]) -> list[Any]:
    """Images stored as 0.<ext>, 1.<ext>, ... in index order; the indices must be 0..n-1."""
    by_index: dict[int, Any] = {}
    for name, value in sample.items():
        match = _INDEXED_IMAGE.match(name)
        if match is None or match.group(2) not in IMAGE_EXTENSIONS:
            continue
        index = int(match.group(1))
        if index in by_index:
            raise SampleError(f"two image members have index {index}", reason="image mismatch", member=name)
        by_index[index] = value
    if sorted(by_index) != list(range(len(by_index))):
        raise SampleError(f"image members must be numbered 0..n-1, found indices {sorted(by_index)}",
                          reason="image mismatch")
    return [by_index[i] for i in range(len(by_index))]
