"""Packing and bucketed padding in the data layer: the DataModule's settings reach the collator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlm.errors import UserError
from vlm.training.datamodule import VLMDataModule


def fake_trainer(tokenizer, *, tokens_per_image: int = 3, max_seq_len: int = 64) -> SimpleNamespace:
    """What the DataModule reads from a trainer: the model's image id, vocabulary, image span, transforms."""
    from tests.data.conftest import to_tensor

    config = SimpleNamespace(image_token_id=tokenizer.image_id,
                             text=SimpleNamespace(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len))
    vision = SimpleNamespace(train_transform=to_tensor, transform=to_tensor)
    model = SimpleNamespace(config=config, tokens_per_image=tokens_per_image, vision=vision)
    return SimpleNamespace(lightning_module=SimpleNamespace(model=model), global_rank=0, world_size=1)


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
