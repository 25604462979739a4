"""Splitting across ranks and workers: whole shards when there are enough, else samples; every
sample exactly once, deterministic, and skips counted once, by the worker that owns the sample."""

import io
import tarfile

import pytest

from vlm.data.decode import SampleError
from vlm.data.pipeline import PipelineConfig, SkipCounter, build_dataloader, build_pipeline

LAYOUTS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (8, 2)]  # (world_size, num_workers)


def sample_keys(samples) -> list[str]:
    """A collator that keeps only the keys (module level: picklable for DataLoader workers)."""
    return [sample.key for sample in samples]


def write_shards(tmp_path, helpers, sizes: list[int]) -> tuple[list[str], list[str]]:
    """Shards of `sizes` caption samples keyed "s{shard}_{i}" -> (shard paths, keys in shard order)."""
    paths, keys = [], []
    for shard, size in enumerate(sizes):
        samples = [helpers.caption_sample(f"s{shard}_{i:03d}", f"caption sample number {i}") for i in range(size)]
        paths.append(helpers.write_shard(tmp_path / f"split-{shard:06d}.tar", samples))
        keys += [sample["__key__"] for sample in samples]
    return paths, keys


def keys_by_worker(config, template, helpers, world_size, num_workers, counters=None) -> dict[tuple, list[str]]:
    """(rank, worker) -> the keys that worker's pipeline yields, in order."""
    result = {}
    for rank in range(world_size):
        for worker in range(num_workers):
            counter = counters.setdefault((rank, worker), SkipCounter()) if counters is not None else None
            pipeline = build_pipeline(config, template, transform=helpers.to_tensor, collator=sample_keys,
                                      counter=counter, rank=rank, world_size=world_size, worker=worker,
                                      num_workers=num_workers)
            result[rank, worker] = [key for batch in pipeline for key in batch]
    return result


@pytest.mark.parametrize("sizes", [[20], [7, 7, 7]], ids=["1shard", "3shards"])
@pytest.mark.parametrize("world_size,num_workers", LAYOUTS)
def test_every_sample_once_and_deterministic(tmp_path, template, helpers, sizes, world_size, num_workers):
    shards, all_keys = write_shards(tmp_path, helpers, sizes)
    config = PipelineConfig(shards, batch_size=3, seed=4, shuffle_buffer=4)
    first = keys_by_worker(config, template, helpers, world_size, num_workers)
    assert keys_by_worker(config, template, helpers, world_size, num_workers) == first
    union = [key for keys in first.values() for key in keys]
    assert len(union) == len(set(union)) and sorted(union) == sorted(all_keys)
    if len(shards) >= world_size * num_workers:  # shard-level split: each worker reads whole shards
        for keys in first.values():
            own_shards = {key.split("_")[0] for key in keys}
            assert sorted(keys) == sorted(key for key in all_keys if key.split("_")[0] in own_shards)
    else:  # sample-level split: shares differ by at most one sample
        sizes_per_worker = [len(keys) for keys in first.values()]
        assert max(sizes_per_worker) - min(sizes_per_worker) <= 1


def test_sample_split_keeps_every_nth_sample_of_the_shard_sequence(tmp_path, template, helpers):
    shards, all_keys = write_shards(tmp_path, helpers, [5, 4, 6])
    config = PipelineConfig(shards, batch_size=2, shuffle=False)
    got = keys_by_worker(config, template, helpers, world_size=2, num_workers=2)
    assert got == {(rank, worker): all_keys[rank * 2 + worker::4] for rank in range(2) for worker in range(2)}


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 2), (8, 2)])
def test_skip_counts_sum_to_the_samples_with_each_bad_one_once(tmp_path, template, helpers, world_size, num_workers):
    good = [helpers.caption_sample(f"g{i:02d}", f"caption sample number {i}") for i in range(9)]
    corrupt_image = {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "txt": "a"}
    unsafe_key = {"__key__": "../evil", "png": helpers.image_bytes(), "txt": "a"}
    cut = [helpers.caption_sample(f"t{i}", f"caption sample number {i}") for i in range(3)]
    cut_bytes = helpers.tar_bytes([(f"{s['__key__']}.{ext}", v if isinstance(v, bytes) else v.encode())
                                   for s in cut for ext, v in s.items() if ext != "__key__"])
    middle_of_t2_png = next(info.offset_data + info.size // 2 for info in tarfile.open(fileobj=io.BytesIO(cut_bytes))
                            if info.name == "t2.png")
    shards = [helpers.write_shard(tmp_path / "a.tar", [*good[:4], corrupt_image]),  # decoding rejects it
              helpers.write_shard(tmp_path / "b.tar", [*good[4:7], unsafe_key, *good[7:]]),  # reading flags it
              helpers.write_shard(tmp_path / "c.tar", cut, truncate_at=middle_of_t2_png)]  # t2 is lost
    config = PipelineConfig(shards, batch_size=2, seed=1, shuffle_buffer=3, handler="skip", max_skip_fraction=1.0,
                            min_samples_before_abort=1)
    counters: dict[tuple, SkipCounter] = {}
    kept = [key for keys in keys_by_worker(config, template, helpers, world_size, num_workers, counters).values()
            for key in keys]
    assert sorted(kept) == sorted([s["__key__"] for s in good] + ["t0", "t1"])
    assert sum(counter.seen for counter in counters.values()) == 5 + 6 + 3
    skips: dict[str, int] = {}
    for counter in counters.values():
        for reason, count in counter.counts().items():
            skips[reason] = skips.get(reason, 0) + count
    assert skips == {"corrupt image": 1, "unsafe key": 1, "truncated shard": 1}


def test_strict_mode_only_the_owner_of_a_bad_sample_raises(tmp_path, template, helpers):
    samples = [helpers.caption_sample("k0", "a"), {"__key__": "../evil", "png": helpers.image_bytes(), "txt": "a"},
               helpers.caption_sample("k2", "a")]
    config = PipelineConfig([helpers.write_shard(tmp_path / "bad.tar", samples)], batch_size=1, shuffle=False)

    def run(rank):
        return [key for batch in build_pipeline(config, template, transform=helpers.to_tensor, collator=sample_keys,
                                                rank=rank, world_size=2) for key in batch]
    assert run(0) == ["k0", "k2"]
    with pytest.raises(SampleError, match="unsafe key"):
        run(1)


def test_dataloader_one_shard_on_eight_ranks_two_workers(tmp_path, template, helpers):
    shards, all_keys = write_shards(tmp_path, helpers, [21])
    config = PipelineConfig(shards, batch_size=2, seed=2, shuffle_buffer=4)
    union, seen = [], 0
    for rank in range(8):
        loader = build_dataloader(config, template, transform=helpers.to_tensor, collator=sample_keys,
                                  num_workers=2, rank=rank, world_size=8)
        union += [key for batch in loader for key in batch]
        seen += loader.dataset.counter.seen
    assert sorted(union) == sorted(all_keys) and seen == len(all_keys)
