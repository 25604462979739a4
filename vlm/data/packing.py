"""Packing: several encoded samples in one row of up to `capacity` tokens, as a pipeline stage.

    ... -> encode -> pack (this module) -> batch (the collator makes one row per `PackedRow`)

A row holds whole samples one after the other (after the collator's <|image|> expansion: an
image takes `image_token_count` positions); a sample longer than a row gets a row of its own and
is cut by the collator's truncation rule. The collator marks each token with its sample's number
in the row (`Batch.sample_ids`: 1, 2, ..., 0 on padding); the text model turns that into a
block-diagonal causal mask with positions restarting per sample, and Flamingo's media masks keep
each token to its own sample's images. Nothing here builds a mask.

First fit over a window of `open_rows` rows: a sample goes into the first open row it fits in, a
new row is opened when none has room, a full row is emitted at once, and when more than
`open_rows` rows are open the oldest is emitted. The result depends only on the order of the
incoming samples, so a pipeline that is deterministic stays so, and a resumed run that skips the
batches already consumed gets exactly the rows it would have seen. Preference pairs are refused:
their two rows must stay aligned, one pair per row pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlm.errors import UserError

if TYPE_CHECKING:
    from vlm.data.formats import EncodedSample


@dataclass(eq=False)  # rows are told apart by identity (two may hold equal samples)
class PackedRow:
    """The samples of one packed row, in order; `length` is their expanded tokens (capped at the row)."""

    samples: list[EncodedSample] = field(default_factory=list)
    length: int = 0

    @property
    def key(self) -> str:
        return "+".join(sample.key for sample in self.samples)


class Packer:
    """Stage: EncodedSamples -> PackedRows of at most `capacity` tokens (see the module docstring).

    Args:
        capacity: tokens per row after image expansion (the collator's `max_length`).
        image_token_count: positions one image takes after expansion (the collator's).
        open_rows: rows kept open for later samples to fill; more packs tighter, and holds back
            (and reorders) more samples.
    """

    def __init__(self, capacity: int, *, image_token_count: int = 1, open_rows: int = 8) -> None:
        for name, value in (("capacity", capacity), ("image_token_count", image_token_count), ("open_rows", open_rows)):
            if type(value) is not int or value < 1:
                raise ValueError(f"Packer {name} must be a positive integer, got {value!r}")
        self.capacity, self.image_token_count, self.open_rows = capacity, image_token_count, open_rows

    def length(self, sample: EncodedSample) -> int:
        """The sample's tokens after expansion, capped at a row (the collator cuts a longer one)."""
        if hasattr(sample, "chosen_ids"):  # duck-typed EncodedPreference: no import of formats needed
            raise UserError(f"data.packing: sample {sample.key!r} is a preference pair, and pairs are not packed "
                            "(their chosen and rejected rows must stay aligned); set data.packing false for this data")
        return min(len(sample.input_ids) + (self.image_token_count - 1) * len(sample.images), self.capacity)

    def __call__(self, samples: Iterable[EncodedSample]) -> Iterator[PackedRow]:
        rows: list[PackedRow] = []
        for sample in samples:
            length = self.length(sample)
            row = next((row for row in rows if row.length + length <= self.capacity), None)
            if row is None:
                row = PackedRow()
                rows.append(row)
            row.samples.append(sample)
            row.length += length
            if row.length == self.capacity:
                rows.remove(row)
                yield row
            elif len(rows) > self.open_rows:
                yield rows.pop(0)
        yield from rows
