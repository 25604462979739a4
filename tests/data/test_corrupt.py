"""Corrupt and hostile shards, made by the tests: strict mode names shard and key, skip mode drops
exactly the bad samples and counts them by reason, bombs are refused fast, nothing is unpickled."""

import io
import pickle
import struct
import tarfile
import time
import zlib

import numpy as np
import pytest

from vlm.data.decode import SampleError, decode_image, decode_sample
from vlm.data.pipeline import PipelineConfig, SkipCounter, TooManySkipsError, build_dataloader, build_pipeline

X = -100


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A 69-byte PNG whose header claims width x height 1-bit pixels (the data is never read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


class Marker:
    """Unpickling this creates the file `path`: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def captions(batches, tokenizer):
    return [tokenizer.decode([int(t) for t in row if t != X and t != tokenizer.eot_id])
            for batch in batches for row in batch.labels]


def bad_samples(helpers, marker) -> dict[str, dict]:
    """reason -> a sample that must be refused for that reason."""
    good_png = helpers.image_bytes()
    return {
        "corrupt image": {"__key__": "garbage", "jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "txt": "a"},
        "empty member": {"__key__": "zero", "png": b"", "txt": "a"},
        "missing caption": {"__key__": "nocap", "png": good_png},
        "image too large": {"__key__": "bomb", "png": bomb_png(), "txt": "a"},
        "pickle member": {"__key__": "pth", "png": good_png, "txt": "a", "pth": pickle.dumps(Marker(marker))},
        "unsafe key": {"__key__": "../evil", "png": good_png, "txt": "a"},
        "bad json": {"__key__": "badjson", "png": good_png, "json": "{not json"},
    }


def test_skip_mode_skips_exactly_the_bad_samples_and_counts_reasons(tmp_path, template, tokenizer, collator, helpers):
    bad = bad_samples(helpers, tmp_path / "marker")
    samples = []
    for index, sample in enumerate(bad.values()):
        samples += [helpers.caption_sample(f"good{index}", f"caption sample number {index}"), sample]
    mixed = helpers.write_shard(tmp_path / "mixed.tar", samples)
    cut = [helpers.caption_sample(f"t{i}", f"caption sample number {10 + i}") for i in range(3)]
    full = helpers.tar_bytes([(f"{s['__key__']}.{e}", v if isinstance(v, bytes) else v.encode())
                              for s in cut for e, v in s.items() if e != "__key__"])
    middle_of_last_png = next(info.offset_data + info.size // 2 for info in tarfile.open(fileobj=io.BytesIO(full))
                              if info.name == "t2.png")
    truncated = helpers.write_shard(tmp_path / "cut.tar", cut, truncate_at=middle_of_last_png)

    counter = SkipCounter()
    config = PipelineConfig([mixed, truncated], batch_size=4, shuffle=False, handler="skip", max_skip_fraction=1.0)
    batches = list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator, counter=counter))
    assert captions(batches, tokenizer) == [f"caption sample number {i}" for i in (*range(len(bad)), 10, 11)]
    assert counter.counts() == {**{reason: 1 for reason in bad}, "truncated shard": 1}
    assert counter.seen == 2 * len(bad) + 3 and counter.skipped == len(bad) + 1
    assert "skipped 8 of 17 samples" in counter.summary() and "truncated shard 1" in counter.summary()
    assert counter.as_dict()["skipped/unsafe key"] == 1 and counter.as_dict()["seen"] == 17
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("reason", ["corrupt image", "empty member", "missing caption", "image too large",
                                    "pickle member", "unsafe key", "bad json"])
def test_strict_mode_names_shard_and_key(tmp_path, reason, template, collator, helpers):
    sample = bad_samples(helpers, tmp_path / "marker")[reason]
    shard = helpers.write_shard(tmp_path / "strict-000001.tar", [helpers.caption_sample("fine", "a"), sample])
    config = PipelineConfig([shard], batch_size=2, shuffle=False, handler="strict")
    with pytest.raises(SampleError) as caught:
        list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator))
    assert caught.value.reason == reason
    assert shard in str(caught.value) and f"'{sample['__key__']}'" in str(caught.value)


def test_truncated_and_corrupt_shards_in_strict_mode(tmp_path, template, collator, helpers):
    samples = [helpers.caption_sample(f"k{i}", "a red square") for i in range(2)]
    data = helpers.tar_bytes([(f"{s['__key__']}.{e}", v if isinstance(v, bytes) else v.encode())
                              for s in samples for e, v in s.items() if e != "__key__"])
    infos = list(tarfile.open(fileobj=io.BytesIO(data)))
    offsets = [info.offset for info in infos]
    assert infos[2].name == "k1.png"
    cases = [  # (reason, shard content, key of the sample lost)
        ("truncated shard", data[: infos[2].offset_data + infos[2].size // 2], "k1"),  # ends inside k1.png
        ("corrupt shard", data[: offsets[2]] + b"x" * 512 + data[offsets[2] + 512:], "k0"),  # k1.png header smashed
    ]
    for index, (reason, content, key) in enumerate(cases):
        shard = tmp_path / f"broken-{index}.tar"
        shard.write_bytes(content)
        config = PipelineConfig([str(shard)], batch_size=1, shuffle=False)
        with pytest.raises(SampleError, match=reason) as caught:
            list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator))
        assert str(shard) in str(caught.value) and f"'{key}'" in str(caught.value)
    shard = tmp_path / "boundary.tar"
    shard.write_bytes(data[: offsets[2]])  # ends cleanly after k0's members, but without end-of-archive
    with pytest.raises(SampleError, match="truncated shard.*'k0'"):
        list(build_pipeline(PipelineConfig([str(shard)], shuffle=False), template,
                            transform=helpers.to_tensor, collator=collator))


def test_bomb_is_refused_fast_before_decoding(tmp_path, template, collator, helpers):
    start = time.perf_counter()
    with pytest.raises(SampleError, match="image too large"):
        decode_image(bomb_png())
    with pytest.raises(SampleError, match="image too large.*5000x4000"):
        decode_image(bomb_png(5000, 4000), max_pixels=4096 * 4096)  # under PIL's own limit: ours applies
    shard = helpers.write_shard(tmp_path / "bomb.tar", [{"__key__": "bomb", "png": bomb_png(), "txt": "a"}])
    config = PipelineConfig([shard], shuffle=False, handler="skip", max_skip_fraction=1.0)
    assert list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator)) == []
    assert time.perf_counter() - start < 1.0


def test_nothing_is_ever_unpickled(tmp_path, template, collator, helpers):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Marker(marker))
    array = io.BytesIO()
    np.save(array, np.array([Marker(marker)], dtype=object), allow_pickle=True)
    samples = [{"__key__": f"p_{ext}", "png": helpers.image_bytes(), "txt": "a", ext: payload}
               for ext in ("pth", "pkl", "pickle", "pyd", "pt")]
    samples.append({"__key__": "p_npy", "png": helpers.image_bytes(), "txt": "a", "npy": array.getvalue()})
    shard = helpers.write_shard(tmp_path / "pickles.tar", samples)
    counter = SkipCounter()
    config = PipelineConfig([shard], shuffle=False, handler="skip", max_skip_fraction=1.0)
    assert list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator, counter=counter)) == []
    assert counter.counts() == {"pickle member": len(samples)}
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: had anything unpickled it, the test would have failed
    assert marker.exists()


def test_other_member_level_refusals(tmp_path, template, collator, helpers):
    png = helpers.image_bytes()
    members = [("dup.txt", b"a"), ("dup.txt", b"b"), ("dup.png", png), ("big.png", png), ("big.txt", b"a")]
    shard = tmp_path / "members.tar"
    shard.write_bytes(helpers.tar_bytes(members))
    counter = SkipCounter()
    config = PipelineConfig([str(shard)], shuffle=False, handler="skip", max_skip_fraction=1.0,
                            max_member_bytes=len(png) - 1)
    assert list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator, counter=counter)) == []
    assert counter.counts() == {"duplicate member": 1, "member too large": 1}
    with pytest.raises(SampleError, match="bad text.*'t'"):
        decode_sample({"__key__": "t", "txt": b"\xff\xfe\xfa"})


def test_skip_mode_aborts_past_the_limit_and_never_sleeps(tmp_path, monkeypatch, template, collator, helpers):
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail(f"slept {seconds} s"))
    samples = [helpers.caption_sample(f"ok{i}", "a") if i % 2 else {"__key__": f"bad{i}", "png": b"", "txt": "a"}
               for i in range(10)]
    shard = helpers.write_shard(tmp_path / "half-bad.tar", samples)

    def run(**limits):
        config = PipelineConfig([shard], batch_size=2, shuffle=False, handler="skip", **limits)
        return list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator))
    with pytest.raises(TooManySkipsError, match=r"skipped 3 of 5 samples \(60.0%\): empty member 3"):
        run(max_skip_fraction=0.2, min_samples_before_abort=5)
    assert sum(batch.input_ids.shape[0] for batch in run(max_skip_fraction=0.2, min_samples_before_abort=11)) == 5
    assert sum(batch.input_ids.shape[0] for batch in run(max_skip_fraction=0.6, min_samples_before_abort=4)) == 5


def test_workers_share_the_skip_counter_and_reraise_strict_errors(tmp_path, template, collator, helpers):
    shards = [helpers.write_shard(tmp_path / f"w-{i}.tar", [helpers.caption_sample(f"ok{i}", "a"),
                                                           {"__key__": f"zero{i}", "png": b"", "txt": "a"}])
              for i in range(2)]
    config = PipelineConfig(shards, batch_size=1, shuffle=False, handler="skip", max_skip_fraction=1.0)
    loader = build_dataloader(config, template, transform=helpers.to_tensor, collator=collator, num_workers=2)
    assert len(list(loader)) == 2
    assert loader.dataset.counter.counts() == {"empty member": 2} and loader.dataset.counter.seen == 4
    strict = PipelineConfig(shards, batch_size=1, shuffle=False, handler="strict")
    loader = build_dataloader(strict, template, transform=helpers.to_tensor, collator=collator, num_workers=2)
    with pytest.raises(SampleError, match=r"empty member.*w-[01]\.tar.*'zero[01]'"):
        list(loader)
