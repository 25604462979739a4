"""Pipeline: shards -> batches round trip with exact tokens, determinism, rank/worker splitting."""

import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image
from webdataset import DataPipeline

from vlm.data.decode import decode_sample
from vlm.data.formats import encode_sample
from vlm.data.pipeline import PipelineConfig, ShardDataset, build_dataloader, build_pipeline, node_info, shard_stages
from vlm.text.tokenizer import END_HEADER, START_HEADER

X = -100
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def run(config, template, collator, helpers, **kwargs):
    return list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator, **kwargs))


def captions(batches, tokenizer) -> list[str]:
    """The learned text of every row: the caption of a caption sample."""
    texts = []
    for batch in batches:
        for row in batch.labels:
            learned = [int(t) for t in row if t != X and t != tokenizer.eot_id]
            texts.append(tokenizer.decode(learned))
    return texts


def expanded(ids, labels, image_id, count=3):
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        repeat = count if token == image_id else 1
        out_ids += [token] * repeat
        out_labels += [X if token == image_id else label] * repeat
    return out_ids, out_labels


def test_round_trip_all_formats_exact_tokens(tmp_path, template, tokenizer, collator, helpers):
    tok = tokenizer
    messages = [{"role": "user", "content": [{"type": "text", "text": "What shape?"}, {"type": "image"}]},
                {"role": "assistant", "content": "a circle"}]
    segments = [{"type": "image", "index": 0}, {"type": "text", "text": "a cat"}, {"type": "image", "index": 1}]
    samples = [
        {"__key__": "cap", "png": helpers.image_bytes(RED), "txt": "a red square"},
        {"__key__": "chat", "0.png": helpers.image_bytes(GREEN), "json": {"messages": messages}},
        {"__key__": "doc", "0.png": helpers.image_bytes(BLUE), "1.webp": helpers.image_bytes(WHITE, fmt="WEBP"),
         "json": {"segments": segments}},
    ]
    shard = helpers.write_shard(tmp_path / "mixed-000000.tar", samples)
    (batch,) = run(PipelineConfig([shard], batch_size=3, shuffle=False), template, collator, helpers)

    def head(role):
        return [tok.special_id(START_HEADER), *tok.encode(role), tok.special_id(END_HEADER), *tok.encode("\n\n")]
    cap_prompt = [tok.bos_id, *head("user"), tok.image_id, tok.eot_id, *head("assistant")]
    cap_answer = [*tok.encode("a red square"), tok.eot_id]
    chat_prompt = [tok.bos_id, *head("user"), *tok.encode("What shape?"), tok.image_id, tok.eot_id, *head("assistant")]
    chat_answer = [*tok.encode("a circle"), tok.eot_id]
    doc = [tok.bos_id, tok.image_id, *tok.encode("a cat"), tok.image_id, tok.eos_id]
    doc_labels = [X, X, *tok.encode("a cat"), X, tok.eos_id]
    rows = [expanded(cap_prompt + cap_answer, [X] * len(cap_prompt) + cap_answer, tok.image_id),
            expanded(chat_prompt + chat_answer, [X] * len(chat_prompt) + chat_answer, tok.image_id),
            expanded(doc, doc_labels, tok.image_id)]
    width = max(len(ids) for ids, _ in rows)
    assert batch.input_ids.tolist() == [ids + [tok.pad_id] * (width - len(ids)) for ids, _ in rows]
    assert batch.labels.tolist() == [labels + [X] * (width - len(labels)) for _, labels in rows]
    assert batch.attention_mask.tolist() == [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
    assert batch.image_sample_index.tolist() == [0, 1, 2, 2]
    expected_pixels = torch.stack([helpers.to_tensor(Image.new("RGB", (4, 4), c)) for c in (RED, GREEN, BLUE, WHITE)])
    assert torch.allclose(batch.pixel_values, expected_pixels, atol=0.02)  # webp is lossy


def test_same_seed_same_batches_other_seed_or_epoch_differs(caption_shards, template, tokenizer, collator, helpers):
    config = PipelineConfig(caption_shards, batch_size=4, seed=7, shuffle_buffer=8)
    first = run(config, template, collator, helpers)
    again = run(config, template, collator, helpers)
    assert len(first) == 5
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
               for a, b in zip(first, again, strict=True))
    order = captions(first, tokenizer)
    assert sorted(order) == sorted(f"caption sample number {i}" for i in range(20))
    other_seed = captions(run(PipelineConfig(caption_shards, batch_size=4, seed=8, shuffle_buffer=8),
                              template, collator, helpers), tokenizer)
    next_epoch = captions(run(config, template, collator, helpers, epoch=1), tokenizer)
    assert other_seed != order and next_epoch != order
    assert sorted(other_seed) == sorted(next_epoch) == sorted(order)
    unshuffled = captions(run(PipelineConfig(caption_shards, batch_size=4, shuffle=False), template, collator, helpers),
                          tokenizer)
    assert unshuffled == [f"caption sample number {i}" for i in range(20)]


def test_two_ranks_two_workers_get_disjoint_shards_covering_all(caption_shards):
    config = PipelineConfig(caption_shards, seed=3)
    seen = []
    for rank in range(2):
        for worker in range(2):
            stages = shard_stages(config, rank=rank, world_size=2, worker=worker, num_workers=2)
            seen.append([source["url"] for source in DataPipeline(stages)])
    assert all(len(urls) == 1 for urls in seen)
    assert sorted(url for urls in seen for url in urls) == sorted(caption_shards)


def test_dataloader_two_ranks_two_workers_see_every_sample_once(caption_shards, template, tokenizer, collator, helpers):
    config = PipelineConfig(caption_shards, batch_size=2, seed=5, shuffle_buffer=4)
    per_rank = []
    for rank in range(2):
        loader = build_dataloader(config, template, transform=helpers.to_tensor, collator=collator,
                                  num_workers=2, rank=rank, world_size=2)
        per_rank.append(captions(list(loader), tokenizer))
        assert per_rank[-1] == captions(list(loader), tokenizer)  # same seed, same batches, workers and all
        assert loader.dataset.counter.seen == 2 * 10
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"caption sample number {i}" for i in range(20))


def test_resampled_is_endless_and_deterministic(caption_shards, template, tokenizer, collator, helpers):
    config = PipelineConfig(caption_shards, batch_size=4, seed=1, resampled=True, shuffle_buffer=4)

    def take(worker, epoch=0):
        pipeline = build_pipeline(config, template, transform=helpers.to_tensor, collator=collator,
                                  worker=worker, num_workers=2, epoch=epoch)
        return captions(islice(pipeline, 12), tokenizer)  # 48 samples from 20: shards were drawn again
    first = take(0)
    assert len(first) == 48 and first == take(0)
    assert first != take(1) and first != take(0, epoch=1)


def test_config_and_node_info(tmp_path, monkeypatch, caption_shards, template, tokenizer, collator, helpers):
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    assert PipelineConfig(pattern).shards == caption_shards
    with pytest.raises(ValueError, match="handler"):
        PipelineConfig(caption_shards, handler="ignore")
    with pytest.raises(ValueError, match="empty"):
        PipelineConfig([])
    with pytest.raises(TypeError):
        PipelineConfig(caption_shards, shuffel=True)  # unknown keys are errors
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert node_info() == (3, 4) and node_info(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="rank"):
        node_info(2, 2)
    # fewer shards than ranks: every rank reads every shard and keeps every 8th sample (no worker processes here)
    dataset = ShardDataset(PipelineConfig(caption_shards, batch_size=4, shuffle=False), template,
                           transform=helpers.to_tensor, collator=collator, rank=5, world_size=8)
    assert captions(list(dataset), tokenizer) == ["caption sample number 5", "caption sample number 13"]


def _read_tar_independently(path: Path) -> list[dict]:
    """Group a shard's members by key with plain tarfile, as a cross-check of our reader."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as archive:
        for info in archive:
            key, _, member = info.name.partition(".")
            samples.setdefault(key, {"__key__": key})[member] = archive.extractfile(info).read()
    return list(samples.values())


@pytest.mark.parametrize("variant", ["caption", "chat", "interleaved"])
def test_shapes_shards_round_trip(tmp_path, variant, template, tokenizer, collator, helpers):
    shapes = pytest.importorskip("vlm.data.shapes")
    shapes.make_shapes_dataset(tmp_path, train=6, val=0, seed=0, variants=[variant], workers=0)
    shards = sorted(str(p) for p in (tmp_path / variant).glob("train-*.tar"))
    batches = run(PipelineConfig(shards, batch_size=6, shuffle=False), template, collator, helpers)
    assert len(batches) == 1
    raw = [s for shard in shards for s in _read_tar_independently(Path(shard))]
    expected = collator([encode_sample(decode_sample(s), template, transform=helpers.to_tensor) for s in raw])
    for name in ("input_ids", "labels", "attention_mask", "pixel_values", "image_sample_index"):
        assert torch.equal(getattr(batches[0], name), getattr(expected, name)), name
    for row, sample in enumerate(raw):  # the learned text is exactly the sample's own text
        learned = tokenizer.decode([int(t) for t in batches[0].labels[row] if t != X], skip_special_tokens=True)
        meta = decode_sample(sample).get("json")
        if variant == "caption":
            assert learned == sample["txt"].decode()
        elif variant == "chat":
            assert learned == "".join(m["content"] for m in meta["messages"] if m["role"] == "assistant")
        else:
            assert learned == "".join(s["text"] for s in meta["segments"] if s["type"] == "text")
