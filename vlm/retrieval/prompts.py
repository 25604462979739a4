"""Few-shot prompts: k (image, caption) demonstrations and then the query image, as one interleaved
document in the layout the interleaved training data has (`vlm.data.formats`, interleaved kind;
`vlm.data.shapes.interleaved_sample`):

    <|begin_of_text|> <|image|> caption_1 "\\n" ... <|image|> caption_k "\\n" <|image|> [target "\\n"]

Each caption with its newline is encoded on its own, as each text segment is in training; each
image is one <|image|> token, which the model expands as its fusion needs: LLaVA to
`tokens_per_image` placeholders that its image's projected tokens fill, in order; Flamingo keeps
one mark per image, and its media mask (`only_attend_immediate`) lets each caption's tokens attend
to the latest image before them, that caption's own. A demonstration without an image is its
caption alone (captions-only retrieval), seeing no image of its own.

A model continues the prompt with the query's caption and its newline, then whatever it learned
follows (the next image is never sampled); `first_line` cuts the answer there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlm.data.formats import EncodedSample
from vlm.errors import UserError
from vlm.retrieval.index import Hit, Index
from vlm.text.chat import IGNORE_INDEX
from vlm.text.tokenizer import Tokenizer

SEPARATOR = "\n"  # ends every caption of an interleaved shapes document


@dataclass(frozen=True)
class Demonstration:
    """One in-context example: a caption, its image (PIL or a transformed [3, H, W] tensor; None for
    the caption alone) and, when it came from an index, its key."""

    caption: str
    image: Any = None
    key: str | None = None


def fewshot_prompt(tokenizer: Tokenizer, demonstrations: Sequence[Demonstration], query_image: Any, *,
                   target: str | None = None, model: Any = None, max_new_tokens: int = 0,
                   key: str = "query") -> EncodedSample:
    """The interleaved prompt of `demonstrations`, in the order given, then `query_image`.

    Args:
        tokenizer: the model's tokenizer.
        demonstrations: the k examples; the one placed last is nearest the query (RICES puts the
            most similar there: `retrieved_demonstrations`).
        query_image: the image to caption (PIL or tensor).
        target: the query's reference caption, appended (with its newline) and labelled: the
            prompt then scores it by teacher forcing (`model(batch).loss`). None: a prompt to
            continue with `VisionLanguageModel.generate`; every label is IGNORE_INDEX.
        model: a VisionLanguageModel: images are transformed by its tower's transform, and the
            prompt (+ `max_new_tokens`) is checked against its `max_seq_len` and, for Flamingo, its
            `max_images`. None: images are kept as given and nothing is checked.
        key: the returned sample's key.
    Returns an `EncodedSample`: `input_ids` (one <|image|> per image), `labels` and `images` (the
    k' demonstration images, then the query's), ready for `generate([s.images], [s.input_ids])`
    or the `Collator`.
    """
    ids, labels, images = [tokenizer.bos_id], [IGNORE_INDEX], []
    for demonstration in demonstrations:
        if demonstration.image is not None:
            ids.append(tokenizer.image_id)
            labels.append(IGNORE_INDEX)
            images.append(demonstration.image)
        text = tokenizer.encode(demonstration.caption.strip() + SEPARATOR)
        ids += text
        labels += [IGNORE_INDEX] * len(text)
    ids.append(tokenizer.image_id)
    labels.append(IGNORE_INDEX)
    images.append(query_image)
    if target is not None:
        answer = tokenizer.encode(target.strip() + SEPARATOR)
        ids += answer
        labels += answer
    sample = EncodedSample(key=key, input_ids=ids, labels=labels, images=images)
    if model is not None:
        check_fits(sample, model, max_new_tokens=max_new_tokens, demonstrations=len(demonstrations))
        transform = model.vision.transform
        sample.images = [image if isinstance(image, torch.Tensor) else transform(image) for image in images]
    return sample


def prompt_length(sample: EncodedSample, tokens_per_image: int) -> int:
    """Positions the prompt takes once each <|image|> is expanded to `tokens_per_image`."""
    return len(sample.input_ids) + (tokens_per_image - 1) * len(sample.images)


def check_fits(sample: EncodedSample, model: Any, *, max_new_tokens: int = 0, demonstrations: int | None = None) -> None:
    """UserError naming the lengths when the prompt and `max_new_tokens` exceed the model's
    `max_seq_len`, or its images the Flamingo resampler's `max_images`."""
    shots = f"{demonstrations} demonstration(s)" if demonstrations is not None else f"prompt {sample.key!r}"
    per_image, limit = model.tokens_per_image, model.config.text.max_seq_len
    length = prompt_length(sample, per_image)
    if length + max_new_tokens > limit:
        text = len(sample.input_ids) - len(sample.images)
        raise UserError(f"few-shot prompt of {shots} is too long: {len(sample.images)} image(s) x {per_image} "
                        f"token(s) + {text} text tokens = {length}, + max_new_tokens {max_new_tokens} = "
                        f"{length + max_new_tokens} > max_seq_len {limit}; use fewer shots")
    max_images = getattr(getattr(model.fusion, "options", None), "max_images", None)
    if max_images is not None and len(sample.images) > max_images:
        raise UserError(f"few-shot prompt of {shots} has {len(sample.images)} images but the model's "
                        f"fusion takes at most max_images={max_images} per sequence; use at most "
                        f"{max_images - 1} shots")


def retrieved_demonstrations(index: Index, hits: Sequence[Hit], *, images: bool = True) -> list[Demonstration]:
    """Demonstrations from search hits (best first), placed most similar last, next to the query
    (RICES's order); `images=False` gives the captions alone."""
    return retrieved_demonstrations_per_query(index, [hits], images=images)[0]


def retrieved_demonstrations_per_query(index: Index, hits: Sequence[Sequence[Hit]], *,
                                       images: bool = True) -> list[list[Demonstration]]:
    """`retrieved_demonstrations` of several queries' hits, their images read in one pass over the
    shards."""
    ordered = [list(reversed(found)) for found in hits]
    rows = [hit.row for found in ordered for hit in found]
    pictures = iter(index.images(rows) if images else [None] * len(rows))
    return [[Demonstration(hit.caption, next(pictures), hit.key) for hit in found] for found in ordered]


def first_line(text: str) -> str:
    """A continuation cut at its first newline: the caption a few-shot prompt asked for."""
    return text.split(SEPARATOR, 1)[0].strip()
