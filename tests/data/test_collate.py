"""Collator: <|image|> expansion, right padding, labels, image_sample_index, truncation policy."""

import logging

import pytest
import torch

from vlm.data.collate import Batch, Collator
from vlm.data.formats import EncodedSample

PAD, IMG, X = 0, 9, -100


def image(value: float) -> torch.Tensor:
    return torch.full((3, 2, 2), value)


def test_expansion_padding_labels_and_image_index():
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=3)
    samples = [
        EncodedSample("a", [1, IMG, 2, 3], [X, X, 2, 3], [image(1.0)]),
        EncodedSample("b", [1, 4], [X, 4], []),
        EncodedSample("c", [1, IMG, 5, IMG], [X, X, 5, X], [image(2.0), image(3.0)]),
    ]
    batch = collator(samples)
    assert batch.input_ids.tolist() == [
        [1, IMG, IMG, IMG, 2, 3, PAD, PAD],
        [1, 4, PAD, PAD, PAD, PAD, PAD, PAD],
        [1, IMG, IMG, IMG, 5, IMG, IMG, IMG],
    ]
    assert batch.labels.tolist() == [
        [X, X, X, X, 2, 3, X, X],
        [X, 4, X, X, X, X, X, X],
        [X, X, X, X, 5, X, X, X],
    ]
    assert batch.attention_mask.tolist() == [[1] * 6 + [0] * 2, [1, 1] + [0] * 6, [1] * 8]
    assert batch.image_sample_index.tolist() == [0, 2, 2]
    assert batch.pixel_values.shape == (3, 3, 2, 2)
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]  # sample order, then appearance
    # Each image occupies exactly image_token_count positions of its row.
    for row in range(3):
        images_in_row = int((batch.image_sample_index == row).sum())
        assert int((batch.input_ids[row] == IMG).sum()) == 3 * images_in_row
    assert all(t.dtype == torch.long for t in (batch.input_ids, batch.labels, batch.attention_mask))


def test_image_token_labels_are_masked_even_if_given():
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=2)
    batch = collator([EncodedSample("k", [IMG, 7], [IMG, 7], [image(0)])])
    assert batch.labels.tolist() == [[X, X, 7]]


def test_batch_without_images_has_none():
    batch = Collator(pad_id=PAD, image_id=IMG)([EncodedSample("k", [1, 2], [X, 2])])
    assert batch.pixel_values is None and batch.image_sample_index is None


def test_truncation_never_cuts_an_image_span(caplog):
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=3, max_length=6)
    # Expanded: [1, 2, IMG, IMG, IMG, 3, IMG, IMG, IMG, 4]: the second span (6..8) does not fit.
    sample = EncodedSample("long", [1, 2, IMG, 3, IMG, 4], [X, 2, X, 3, X, 4], [image(1), image(2)])
    with caplog.at_level(logging.WARNING):
        batch = collator([sample])
    assert batch.input_ids.tolist() == [[1, 2, IMG, IMG, IMG, 3]]
    assert batch.pixel_values.shape[0] == 1 and batch.image_sample_index.tolist() == [0]
    assert collator.dropped_images == 1 and collator.truncated_samples == 1
    assert "long" in caplog.text and "dropped 1 image" in caplog.text
    # A cut that would fall inside a span moves to the span start.
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=3, max_length=4)
    batch = collator([sample])
    assert batch.input_ids.tolist() == [[1, 2]] and batch.pixel_values is None


def test_truncation_of_text_only_keeps_images():
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=2, max_length=4)
    batch = collator([EncodedSample("k", [IMG, 5, 6, 7], [X, 5, 6, 7], [image(1)])])
    assert batch.input_ids.tolist() == [[IMG, IMG, 5, 6]] and batch.labels.tolist() == [[X, X, 5, 6]]
    assert collator.dropped_images == 0 and collator.truncated_samples == 1


def test_mismatch_and_untransformed_images_are_clear_errors():
    collator = Collator(pad_id=PAD, image_id=IMG)
    with pytest.raises(ValueError, match=r"sample 'odd': 2 <\|image\|> token\(s\) but 1 image"):
        collator([EncodedSample("odd", [IMG, IMG], [X, X], [image(1)])])
    with pytest.raises(TypeError, match="pil.*transform"):
        collator([EncodedSample("pil", [IMG], [X], ["not a tensor"])])
    with pytest.raises(ValueError, match="share a shape"):
        collator([EncodedSample("a", [IMG], [X], [image(1)]), EncodedSample("b", [IMG], [X], [torch.zeros(3, 4, 4)])])


def test_invalid_settings():
    with pytest.raises(ValueError, match="image_token_count"):
        Collator(pad_id=PAD, image_id=IMG, image_token_count=0)
    with pytest.raises(ValueError, match="pad_id and image_id"):
        Collator(pad_id=IMG, image_id=IMG)


def test_batch_to_moves_every_tensor_and_keeps_none():
    batch = Collator(pad_id=PAD, image_id=IMG)([EncodedSample("k", [IMG, 1], [X, 1], [image(1)])])
    moved = batch.to("meta")
    assert isinstance(moved, Batch)
    assert all(getattr(moved, name).device.type == "meta" for name in
               ("input_ids", "labels", "attention_mask", "pixel_values", "image_sample_index"))
    empty = Batch(batch.input_ids, batch.labels, batch.attention_mask).to("meta")
    assert empty.pixel_values is None and empty.image_sample_index is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_pin_memory():
    batch = Collator(pad_id=PAD, image_id=IMG)([EncodedSample("k", [IMG, 1], [X, 1], [image(1)])])
    assert batch.pin_memory().pixel_values.is_pinned()


def test_pad_to_multiple_of_rounds_every_batch_length_up():
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=3, pad_to_multiple_of=4)
    samples = [EncodedSample("a", [1, IMG, 2], [X, X, 2], [image(1.0)]), EncodedSample("b", [1, 4], [X, 4], [])]
    batch = collator(samples)  # longest row 5 tokens -> 8
    plain = Collator(pad_id=PAD, image_id=IMG, image_token_count=3)(samples)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (2, 8)
    assert torch.equal(batch.input_ids[:, :5], plain.input_ids) and (batch.input_ids[:, 5:] == PAD).all()
    assert (batch.labels[:, 5:] == X).all() and batch.attention_mask.sum().item() == plain.attention_mask.sum().item()
    assert [collator.padded_length(n) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert collator([EncodedSample("c", [1, 2, 3, 4], [X, 2, 3, 4], [])]).input_ids.shape == (1, 4)  # a multiple stays
    assert Collator(pad_id=PAD, image_id=IMG, image_token_count=3, pad_to_multiple_of=1)(samples).input_ids.shape == (2, 5)
    for bad in (0, -8, True):
        with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
            Collator(pad_id=PAD, image_id=IMG, pad_to_multiple_of=bad)
