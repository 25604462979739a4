"""Collation: encoded samples -> one padded `Batch` of tensors.

The collator knows one number about the model, `image_token_count`: how many sequence positions
one image occupies (the vision encoder's token count for early fusion, 1 for cross-attention
fusion). Each <|image|> token is expanded to that many; fusions find image positions as
`input_ids == image_id`. It never asks which fusion it serves.

Truncation policy (`max_length`): a sequence is cut at `max_length`, or earlier at the start of an
image span that would not fit whole, so no image is ever half in the sequence. Images whose span
is cut off are dropped from `pixel_values`, and a warning names the sample. The collator counts
these events in `truncated_samples` and `dropped_images` (per process).

Preference pairs (`EncodedPreference`) make a batch of 2B rows: the B chosen sequences, then the B
rejected ones, images stored once per pair. Both rows of a pair are expanded and cut by the same
rule; since they share their prompt, they keep the same images. A pair whose prompt (images
expanded) leaves no room for at least one token of each answer within `max_length` is dropped
from the batch with a warning (counted in `dropped_pairs`); a batch left with no pair is an error.
A batch mixes no preference pairs with other samples.

Packed rows (`vlm.data.packing.PackedRow`, several samples per row) are expanded and cut sample by
sample as above, then joined; `Batch.sample_ids` numbers each token's sample in its row (1, 2, ...;
0 on padding), and the first token of every sample is unlabelled, so that no sample learns from
the one before it (a row's first label is never learned anyway: position t predicts label t+1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlm.data.formats import EncodedPreference, EncodedSample

IGNORE_INDEX = -100  # same value as vlm.text.chat.IGNORE_INDEX; kept local so collation needs no tokenizer
log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A training batch.

    Rows are samples, except in a preference batch (`pairs` set): rows i and pairs+i are the chosen
    and rejected answers of pair i; images are stored once per pair.

    Attributes:
        input_ids: [B, T] long, right-padded with the pad id.
        labels: [B, T] long, -100 on padding, image tokens and anything not learned.
        attention_mask: [B, T] long, 1 on real tokens, 0 on padding.
        pixel_values: [N, 3, H, W] float, all images of the batch in sample order then order of
            appearance; None if the batch has no image.
        image_sample_index: [N] long, the row of `input_ids` each image belongs to (in a preference
            batch: its pair, 0..pairs-1, whose two rows both hold it); None if no image.
        keys: each row's sample key (`__key__`), for predictions and error messages (a pair's key
            appears on both its rows).
        image_features: [N, num_tokens, dim], the frozen tower's cached outputs for the N images,
            in place of `pixel_values` (see `vlm.data.features`); in a cached-features run a batch
            without images has it empty, [0, num_tokens, dim] (`FeatureCollator`); None otherwise.
        pairs: B in a preference batch of 2B rows (B chosen rows, then B rejected rows); None otherwise.
        sample_ids: [B, T] long in a packed batch: each token's sample within its row, 1, 2, ...,
            0 on padding (the text model attends within samples only); None otherwise.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_sample_index: torch.Tensor | None = None
    keys: tuple[str, ...] | None = None
    image_features: torch.Tensor | None = None
    pairs: int | None = None
    sample_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned memory (the DataLoader calls this when `pin_memory=True`)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> Batch:
        return Batch(**{f.name: fn(value) if isinstance(value := getattr(self, f.name), torch.Tensor) else value
                        for f in fields(self)})


class Collator:
    """Turns a list of `EncodedSample`, or a list of `EncodedPreference`, into a `Batch`.

    Args:
        pad_id: token id used for right padding.
        image_id: id of the <|image|> token.
        image_token_count: positions one image occupies after expansion (>= 1).
        max_length: longest sequence kept after expansion (see the module docstring); None keeps all.
        features: the samples' images are cached tower outputs [num_tokens, dim], collated into
            `Batch.image_features` instead of `pixel_values`.
        pad_to_multiple_of: every batch's length is rounded up to a multiple of it (more padding),
            so that a compiled model sees a bounded number of sequence lengths; None pads to the
            longest row only.
    """

    def __init__(self, *, pad_id: int, image_id: int, image_token_count: int = 1, max_length: int | None = None,
                 features: bool = False, pad_to_multiple_of: int | None = None):
        if image_token_count < 1:
            raise ValueError(f"image_token_count must be >= 1, got {image_token_count}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of!r}")
        if pad_id == image_id:
            raise ValueError(f"pad_id and image_id are both {pad_id}; padding would look like image slots")
        self.pad_id, self.image_id = pad_id, image_id
        self.image_token_count, self.max_length = image_token_count, max_length
        self.features = features
        self.pad_to_multiple_of = pad_to_multiple_of
        self.truncated_samples = 0
        self.dropped_images = 0
        self.dropped_pairs = 0

    def __call__(self, samples: Sequence[EncodedSample] | Sequence[EncodedPreference]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        preference = [hasattr(sample, "chosen_ids") for sample in samples]  # duck-typed: no tokenizer import
        if any(preference):
            if not all(preference):
                kinds = sorted({type(sample).__name__ for sample in samples})
                raise ValueError(f"a batch cannot mix preference pairs with other samples (got {kinds}, "
                                 f"keys {[sample.key for sample in samples][:8]}); give them separate datasets")
            return self._collate_pairs(samples)
        if any(hasattr(sample, "samples") for sample in samples):  # duck-typed PackedRow
            return self._collate_packed(samples)
        rows = [self.expand(sample) for sample in samples]
        owners = [row for row, (_, _, row_images) in enumerate(rows) for _ in row_images]
        return self._batch(rows, [row_images for _, _, row_images in rows], owners,
                           keys=tuple(sample.key for sample in samples))

    def _collate_packed(self, packed: Sequence) -> Batch:
        """One row per PackedRow: its samples expanded (and cut) one by one, then joined."""
        rows, sample_ids = [], []
        for row in packed:
            parts = [self.expand(sample) for sample in getattr(row, "samples", [row])]
            for _, labels, _ in parts:
                labels[:1] = IGNORE_INDEX  # no sample learns its first token from the one before it
            rows.append((torch.cat([ids for ids, _, _ in parts]), torch.cat([labels for _, labels, _ in parts]),
                         [image for _, _, images in parts for image in images]))
            sample_ids.append(torch.cat([torch.full((len(ids),), number, dtype=torch.long)
                                         for number, (ids, _, _) in enumerate(parts, 1)]))
        owners = [row for row, (_, _, row_images) in enumerate(rows) for _ in row_images]
        keys = tuple(getattr(row, "key") for row in packed)
        batch = self._batch(rows, [row_images for _, _, row_images in rows], owners, keys=keys)
        batch.sample_ids = torch.zeros_like(batch.input_ids)
        for row, ids in enumerate(sample_ids):
            batch.sample_ids[row, : len(ids)] = ids
        return batch

    def _collate_pairs(self, pairs: Sequence[EncodedPreference]) -> Batch:
        """2B rows (chosen rows, then rejected rows), each pair's images once, owners = pair index."""
        chosen, rejected, kept = [], [], []
        for pair in pairs:
            rows = self._expand_pair(pair)
            if rows is not None:
                chosen.append(rows[0])
                rejected.append(rows[1])
                kept.append(pair)
        if not kept:
            raise ValueError(f"no preference pair of this batch fits max_length {self.max_length} "
                             f"(keys {[pair.key for pair in pairs][:8]}): each needs its whole prompt and "
                             "at least one token of each answer; raise max_length")
        images = [row_images for _, _, row_images in chosen]  # the same images as the rejected row
        owners = [index for index, pair_images in enumerate(images) for _ in pair_images]
        keys = tuple(pair.key for pair in kept)
        return self._batch(chosen + rejected, images, owners, keys=keys + keys, pairs=len(kept))

    def _expand_pair(self, pair: EncodedPreference) -> tuple[tuple, tuple] | None:
        """Both rows expanded and cut by the same rule, or None (counted, warned) when the prompt
        leaves no room for each answer's first token. The prompt is what precedes the first label."""
        prompt = _prompt_length(pair.chosen_labels)
        shared = list(pair.chosen_ids[:prompt]) == list(pair.rejected_ids[:prompt])
        if (not shared or _prompt_length(pair.rejected_labels) != prompt
                or prompt == len(pair.chosen_ids) or prompt == len(pair.rejected_ids)):
            raise ValueError(f"pair {pair.key!r}: the chosen and rejected rows must share their prompt (the "
                             "tokens before the first label) and each have a labelled answer after it")
        expanded = prompt + (self.image_token_count - 1) * list(pair.chosen_ids[:prompt]).count(self.image_id)
        if self.max_length is not None and expanded >= self.max_length:
            self.dropped_pairs += 1
            log.warning("preference pair %r dropped: its prompt takes %d tokens, max_length %d leaves no "
                        "room for the answers", pair.key, expanded, self.max_length)
            return None
        return (self._expand(pair.key, pair.chosen_ids, pair.chosen_labels, pair.images),
                self._expand(pair.key, pair.rejected_ids, pair.rejected_labels, pair.images))

    def _batch(self, rows: list[tuple], images: list[list], owners: list[int], *, keys: tuple[str, ...],
               pairs: int | None = None) -> Batch:
        """Right-pad `rows` (ids, labels, _) into one Batch; `images` per owner, flattened in order."""
        length = self.padded_length(max(len(ids) for ids, _, _ in rows))
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (ids, row_labels, _) in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = row_labels
            attention_mask[row, : len(ids)] = 1
        flat = [image for group in images for image in group]
        if not flat:
            return Batch(input_ids, labels, attention_mask, keys=keys, pairs=pairs)
        stacked = _stack_images(flat, [keys[owner] for owner in owners], features=self.features)
        owners = torch.tensor(owners, dtype=torch.long)
        if self.features:
            return Batch(input_ids, labels, attention_mask, None, owners, keys, image_features=stacked, pairs=pairs)
        return Batch(input_ids, labels, attention_mask, stacked, owners, keys, pairs=pairs)

    def padded_length(self, longest: int) -> int:
        """The batch length for a longest row of `longest` tokens (see `pad_to_multiple_of`)."""
        multiple = self.pad_to_multiple_of
        return longest if multiple is None else -(-longest // multiple) * multiple

    def expand(self, sample: EncodedSample) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Expanded (and possibly truncated) ids [T'], labels [T'] and the images kept."""
        return self._expand(sample.key, sample.input_ids, sample.labels, sample.images)

    def _expand(self, key: str, input_ids: Sequence[int], labels: Sequence[int],
                images: Sequence) -> tuple[torch.Tensor, torch.Tensor, list]:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if ids.ndim != 1 or ids.shape != labels.shape:
            raise ValueError(f"sample {key!r}: input_ids {tuple(ids.shape)} and labels "
                             f"{tuple(labels.shape)} must be 1-D of the same length")
        is_image = ids == self.image_id
        if int(is_image.sum()) != len(images):
            raise ValueError(f"sample {key!r}: {int(is_image.sum())} <|image|> token(s) but "
                             f"{len(images)} image(s)")
        repeats = torch.where(is_image, self.image_token_count, 1)  # [T]
        ids, labels = ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)  # [T']
        labels[ids == self.image_id] = IGNORE_INDEX
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels, list(images)
        span_starts = (torch.cumsum(repeats, 0) - repeats)[is_image].tolist()
        cut, kept = self.max_length, 0
        for start in span_starts:
            if start + self.image_token_count > cut:
                cut = min(cut, start)  # this span would be cut: drop it whole, and all later ones
                break
            kept += 1
        self._report_truncation(key, len(ids), cut, len(images) - kept)
        return ids[:cut], labels[:cut], list(images[:kept])

    def _report_truncation(self, key: str, length: int, cut: int, dropped: int) -> None:
        self.truncated_samples += 1
        self.dropped_images += dropped
        if dropped:
            log.warning("sample %r: %d tokens truncated to %d (max_length %d); dropped %d image(s) "
                        "whose span did not fit", key, length, cut, self.max_length, dropped)


def _prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the first learned label (all of them if none is learned)."""
    return next((index for index, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _stack_images(images: list, keys: list[str], *, features: bool = False) -> torch.Tensor:
    """[N, 3, H, W] from N tensors [3, H, W] (or [N, tokens, dim] from cached features); clear
    errors for untransformed or mixed-size images."""
    for image, key in zip(images, keys):
        if isinstance(image, torch.Tensor) and (image.ndim == 2) != features:
            raise TypeError(f"sample {key!r}: got an image tensor of shape {list(image.shape)} where "
                            f"{'cached features [tokens, dim]' if features else 'a transformed image [3, H, W]'} "
                            "was expected")
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"sample {key!r}: images must be tensors [3, H, W] for collation, got "
                            f"{type(image).__name__}; pass the vision encoder's transform to encode_sample")
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) != 1:
        raise ValueError(f"images of one batch must share a shape, got {sorted(shapes)} (samples {sorted(set(keys))})")
    return torch.stack(images)
