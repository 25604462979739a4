"""ShardWriter: key sanitising, rollover by count and bytes, atomic shards, summary."""

import json
import re
import tarfile

import pytest

from vlm.data.writer import ShardWriter, SplitWriter, sanitize_key, split_of


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.mark.parametrize("raw, clean", [
    ("../etc/passwd", "etc/passwd"),
    ("/abs/path/x", "abs/path/x"),
    ("a/../../b", "a/b"),
    ("..\\..\\windows\\system32", "windows/system32"),
    ("./a//b/.", "a/b"),
    ("img 01.final.jpg", "img_01_final_jpg"),
    ("café:ü?*", "caf_____"),
    ("COCO_train2014-000000000009", "COCO_train2014-000000000009"),
    ("...hidden", "___hidden"),
])
def test_sanitize_key(raw, clean):
    assert sanitize_key(raw) == clean
    assert sanitize_key(clean) == clean  # idempotent
    assert re.fullmatch(r"[A-Za-z0-9_/-]+", clean) and ".." not in clean and not clean.startswith("/")


@pytest.mark.parametrize("raw", ["", "..", "/", "../..", "./."])
def test_sanitize_key_rejects_empty(raw):
    with pytest.raises(ValueError, match="empty after sanitising"):
        sanitize_key(raw)


def test_rollover_by_count_and_naming(tmp_path):
    with ShardWriter(tmp_path, prefix="train", max_count=3) as writer:
        for i in range(7):
            writer.write({"__key__": f"s{i}", "txt": f"caption {i}", "json": {"i": i}})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.rsplit("/", 1)[-1] for p in writer.summary.shards] == names
    first = _members(tmp_path / names[0])
    assert [n for n, _ in first] == ["s0.txt", "s0.json", "s1.txt", "s1.json", "s2.txt", "s2.json"]
    assert first[0][1] == b"caption 0" and json.loads(first[1][1]) == {"i": 0}
    assert [len(_members(tmp_path / n)) for n in names] == [6, 6, 2]
    assert writer.summary.written == 7


def test_rollover_by_bytes_is_exact(tmp_path):
    # One sample: 512 header + 3072 (3000 padded) + 512 header + 512 (json padded) = 4608 bytes.
    # A shard closes with 1024 zero bytes and pads to 10240: 4 samples fit in 20480, 5 do not.
    with ShardWriter(tmp_path, max_bytes=20480) as writer:
        for i in range(9):
            writer.write({"__key__": f"{i:03d}", "bin": bytes([i]) * 3000, "json": {"i": i}})
        writer.write({"__key__": "big", "bin": b"x" * 50_000})  # bigger than a shard: alone
    shards = sorted(tmp_path.glob("train-*.tar"))
    counts = [len(_members(p)) for p in shards]
    assert counts == [8, 8, 2, 1]
    assert all(p.stat().st_size <= 20480 for p in shards[:3])
    assert writer.summary.bytes_written == sum(p.stat().st_size for p in shards)


def test_same_samples_give_identical_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name) as writer:
            writer.write({"__key__": "k", "png": b"\x89PNG", "txt": "hello", "json": {"x": [1, 2]}})
    assert (tmp_path / "a/train-000000.tar").read_bytes() == (tmp_path / "b/train-000000.tar").read_bytes()


def test_shards_are_atomic(tmp_path):
    writer = ShardWriter(tmp_path, max_count=2)
    for i in range(3):
        writer.write({"__key__": f"k{i}", "txt": "x"})
    # Shard 0 is complete; shard 1 is still being written under its temporary name only.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar.tmp"]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]


def test_error_mid_shard_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_count=2) as writer:
            for i in range(3):
                writer.write({"__key__": f"k{i}", "txt": "x"})
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    assert writer.summary.written == 2


def test_keys_are_sanitised_and_duplicates_skipped(tmp_path):
    with ShardWriter(tmp_path) as writer:
        assert writer.write({"__key__": "../etc/passwd", "txt": "a"})
        assert not writer.write({"__key__": "etc/passwd", "txt": "b"})  # same key once sanitised
        writer.skip("missing image", key="img7")
    assert [n for n, _ in _members(tmp_path / "train-000000.tar")] == ["etc/passwd.txt"]
    assert writer.summary.skipped == {"duplicate key": 1, "missing image": 1}
    text = writer.summary.describe()
    assert "wrote 1 samples in 1 shards" in text and "duplicate key: 1 (e.g. etc/passwd)" in text
    assert "missing image: 1 (e.g. img7)" in text


def test_existing_shards_need_overwrite(tmp_path):
    (tmp_path / "train-000005.tar").write_bytes(b"stale")
    (tmp_path / "other-000000.tar").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="train-000005.tar"):
        ShardWriter(tmp_path)
    with ShardWriter(tmp_path, overwrite=True) as writer:
        writer.write({"__key__": "k", "txt": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-000000.tar", "train-000000.tar"]


def test_bad_samples_are_clear_errors(tmp_path):
    writer = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="without __key__"):
        writer.write({"txt": "x"})
    with pytest.raises(ValueError, match="'k'.*'JPG'"):
        writer.write({"__key__": "k", "JPG": b"x"})
    with pytest.raises(TypeError, match="'k'.*'txt'.*int"):
        writer.write({"__key__": "k", "txt": 3})
    with pytest.raises(ValueError, match="prefix"):
        ShardWriter(tmp_path, prefix="../x")
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_split_writer_routes_by_hash_and_summarises(tmp_path):
    keys = [f"s{i}" for i in range(40)]
    with SplitWriter(tmp_path, val_fraction=0.25, max_count=8) as writer:
        for key in keys:
            writer.write({"__key__": key, "txt": key})
        assert not writer.write({"__key__": "s3", "txt": "again"})  # unique over both splits
        writer.write({"__key__": "grouped", "txt": "x"}, group="s0")  # follows its group
    summary = writer.summary
    val = {k for k in keys if split_of(k, 0.25) == "val"} | ({"grouped"} if split_of("s0", 0.25) == "val" else set())
    names = {split: {n.split(".")[0] for p in sorted(tmp_path.glob(f"{split}-*.tar")) for n, _ in _members(p)}
             for split in ("train", "val")}
    assert 0 < len(val) < 20 and names == {"train": (set(keys) | {"grouped"}) - val, "val": val}
    assert summary.splits == {"train": 41 - len(val), "val": len(val)}
    assert summary.written == 41 and summary.skipped == {"duplicate key": 1}
    text = summary.describe()
    assert f"--data.train_shards '{tmp_path}/train-*.tar'" in text
    assert f"--data.val_shards '{tmp_path}/val-*.tar'" in text and "duplicate key: 1 (e.g. s3)" in text
    with pytest.raises(ValueError, match="--split val or --val-fraction, not both"):
        SplitWriter(tmp_path / "x", split="val", val_fraction=0.1)
    with pytest.raises(ValueError, match="val fraction"):
        SplitWriter(tmp_path / "x", val_fraction=1.0)
