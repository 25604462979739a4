"""Packing in the data layer (first-fit packer, collation of packed rows, pipeline, exact resume)
and bucketed padding (data.pad_to_multiple_of); the DataModule's settings reach the collator."""

from __future__ import annotations

import random
from itertools import islice
from types import SimpleNamespace

import pytest
import torch

from vlm.data.collate import Collator
from vlm.data.formats import EncodedPreference, EncodedSample
from vlm.data.packing import PackedRow, Packer
from vlm.data.pipeline import PipelineConfig, build_pipeline
from vlm.errors import UserError
from vlm.training.datamodule import VLMDataModule

PAD, IMG, X = 0, 9, -100


def fake_trainer(tokenizer, *, tokens_per_image: int = 3, max_seq_len: int = 64) -> SimpleNamespace:
    """What the DataModule reads from a trainer: the model's image id, vocabulary, image span, transforms."""
    from tests.data.conftest import to_tensor

    config = SimpleNamespace(image_token_id=tokenizer.image_id,
                             text=SimpleNamespace(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len))
    vision = SimpleNamespace(train_transform=to_tensor, transform=to_tensor)
    model = SimpleNamespace(config=config, tokens_per_image=tokens_per_image, vision=vision)
    return SimpleNamespace(lightning_module=SimpleNamespace(model=model, objective="next_token"), global_rank=0,
                           world_size=1)


def datamodule(tmp_path, tokenizer, shards, **options) -> VLMDataModule:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    data = VLMDataModule(train_shards=shards, val_shards=shards, tokenizer=str(path), num_workers=0, **options)
    data.setup()
    data.trainer = fake_trainer(tokenizer)
    return data


def test_pad_to_multiple_of_pads_train_and_validation_batches(tmp_path, tokenizer, caption_shards):
    data = datamodule(tmp_path, tokenizer, caption_shards, batch_size=3, pad_to_multiple_of=16)
    for loader in (data.train_dataloader(), data.val_dataloader()):
        for _, batch in zip(range(4), loader):
            assert batch.input_ids.shape[1] % 16 == 0
            assert batch.input_ids.shape[1] - int(batch.attention_mask.sum(1).max()) < 16


@pytest.mark.parametrize("bad", [0, -4, 2.5, "8", True])
def test_bad_pad_to_multiple_of_is_one_line(tmp_path, bad):
    with pytest.raises(UserError, match=r"^data.pad_to_multiple_of must be a positive integer or null, got"):
        VLMDataModule(train_shards="x.tar", pad_to_multiple_of=bad)


# --- the packer ----------------------------------------------------------------------------------

def text_sample(key: str, length: int, images: int = 0) -> EncodedSample:
    """`length` tokens (ids 10, 11, ...), the first `images` of them after the first being <|image|>."""
    ids = [10 + i for i in range(length)]
    ids[1 : 1 + images] = [IMG] * images
    return EncodedSample(key, ids, [X] + ids[1:], [torch.full((3, 2, 2), float(i)) for i in range(images)])


def keys(rows) -> list[list[str]]:
    return [[sample.key for sample in row.samples] for row in rows]


def test_first_fit_rows_by_hand():
    lengths = [6, 5, 4, 3, 7, 2, 10, 12]
    samples = [text_sample(str(i), n) for i, n in enumerate(lengths)]
    rows = list(Packer(10, open_rows=2)(samples))
    assert keys(rows) == [["0", "2"], ["1", "3", "5"], ["6"], ["7"], ["4"]]  # full rows leave at once
    assert [row.length for row in rows] == [10, 10, 10, 10, 7]  # sample 7 (12 tokens) is cut to the row
    assert keys(Packer(10, open_rows=1)(samples)) == [["0"], ["1", "2"], ["3", "4"], ["6"], ["7"], ["5"]]
    assert rows[0].key == "0+2"


def test_image_expansion_counts_and_the_packer_is_deterministic():
    packer = Packer(12, image_token_count=4)
    assert packer.length(text_sample("a", 3, images=2)) == 3 + 2 * 3
    rng = random.Random(0)
    samples = [text_sample(f"s{i}", rng.randint(2, 9), images=rng.randint(0, 1)) for i in range(60)]
    first, again = list(packer(samples)), list(Packer(12, image_token_count=4)(samples))
    assert keys(first) == keys(again)
    assert sorted(k for row in keys(first) for k in row) == sorted(s.key for s in samples)  # each sample once
    assert all(row.length <= 12 for row in first) and sum(map(len, keys(first))) == 60


def test_preference_pairs_and_bad_settings_are_refused_in_one_line():
    pair = EncodedPreference("pair7", [1, 2], [X, 2], [1, 3], [X, 3])
    with pytest.raises(UserError, match=r"^data.packing: sample 'pair7' is a preference pair, and pairs are not packed[^\n]*$"):
        list(Packer(8)([text_sample("a", 3), pair]))
    for name, bad in (("capacity", 0), ("open_rows", -1), ("image_token_count", 1.5)):
        with pytest.raises(ValueError, match=f"Packer {name} must be a positive integer"):
            Packer(**{"capacity": 8, name: bad})


# --- collation of packed rows --------------------------------------------------------------------

def test_collated_packed_rows_join_samples_as_collated_alone():
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=3, max_length=12)
    a, b, c, long = text_sample("a", 4, images=1), text_sample("b", 3), text_sample("c", 5, images=2), text_sample("d", 20)
    batch = collator([PackedRow([a, b]), PackedRow([c]), PackedRow([long])])
    alone = [collator.expand(sample) for sample in (a, b, c, long)]
    assert batch.input_ids[0, :9].tolist() == alone[0][0].tolist() + alone[1][0].tolist()
    assert batch.labels[0, :9].tolist() == [X] + alone[0][1][1:].tolist() + [X] + alone[1][1][1:].tolist()
    assert batch.sample_ids.tolist() == [[1] * 6 + [2] * 3 + [0] * 3, [1] * 9 + [0] * 3, [1] * 12]
    assert torch.equal(batch.attention_mask.bool(), batch.sample_ids > 0)
    assert batch.input_ids[2].tolist() == alone[3][0].tolist() and collator.truncated_samples == 2  # d, twice
    assert batch.image_sample_index.tolist() == [0, 1, 1] and batch.pixel_values[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert batch.keys == ("a+b", "c", "d")
    assert Collator(pad_id=PAD, image_id=IMG, image_token_count=3, pad_to_multiple_of=8)(
        [PackedRow([a, b])]).sample_ids.tolist() == [[1] * 6 + [2] * 3 + [0] * 7]


# --- in the pipeline and the DataModule ----------------------------------------------------------

def pipeline_rows(shards, template, helpers, collator, *, shuffle: bool, batches: int = 50) -> list:
    config = PipelineConfig(shards=shards, batch_size=2, shuffle=shuffle, shuffle_buffer=10)
    pipeline = build_pipeline(config, template, transform=helpers.to_tensor, collator=collator,
                              packer=Packer(64, image_token_count=3, open_rows=3))
    return list(islice(pipeline, batches))


def test_pipeline_packs_every_sample_once_deterministically(caption_shards, template, helpers, tokenizer):
    collator = Collator(pad_id=tokenizer.pad_id, image_id=tokenizer.image_id, image_token_count=3, max_length=64)
    batches = pipeline_rows(caption_shards, template, helpers, collator, shuffle=False)
    packed = [key for batch in batches for row in batch.keys for key in row.split("+")]
    assert sorted(packed) == sorted(f"s{s}_{i:03d}" for s in range(4) for i in range(5))
    assert max(batch.sample_ids.max() for batch in batches) >= 2 and all(b.input_ids.shape[1] <= 64 for b in batches)
    shuffled = pipeline_rows(caption_shards, template, helpers, collator, shuffle=True)
    again = pipeline_rows(caption_shards, template, helpers, collator, shuffle=True)
    assert [b.keys for b in shuffled] == [b.keys for b in again] != [b.keys for b in batches]
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.sample_ids, y.sample_ids)
               for x, y in zip(shuffled, again))


def test_resume_with_packing_gives_exactly_the_next_batches(tmp_path, tokenizer, caption_shards):
    options = dict(batch_size=2, packing=True, max_length=48, shuffle_buffer=8)
    full = list(islice(datamodule(tmp_path, tokenizer, caption_shards, **options).train_dataloader(), 7))
    assert all(batch.sample_ids is not None and batch.input_ids.shape[1] <= 48 for batch in full)
    resumed = datamodule(tmp_path, tokenizer, caption_shards, **options)
    resumed.load_state_dict({"batches_consumed": 4})
    after = list(islice(resumed.train_dataloader(), 3))
    assert [b.keys for b in after] == [b.keys for b in full[4:]]
    for x, y in zip(after, full[4:]):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.sample_ids, y.sample_ids)
        assert torch.equal(x.pixel_values, y.pixel_values)


def test_validation_is_not_packed_and_bad_settings_are_one_line(tmp_path, tokenizer, caption_shards):
    data = datamodule(tmp_path, tokenizer, caption_shards, batch_size=2, packing=True)
    assert next(iter(data.val_dataloader())).sample_ids is None
    assert next(iter(data.train_dataloader())).input_ids.shape[1] <= 64  # the text model's max_seq_len
    data.trainer.lightning_module.objective = "dpo"
    with pytest.raises(UserError, match=r"^data.packing: model.objective dpo trains on preference pairs"):
        data.train_dataloader()
    with pytest.raises(UserError, match=r"^data.packing must be true or false, got 'yes'$"):
        VLMDataModule(train_shards="x.tar", packing="yes")
