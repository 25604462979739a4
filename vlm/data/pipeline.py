"""Streaming webdataset shards into batches: a plain list of stages handed to `wds.DataPipeline`.

    shards (list shuffled by seed+epoch, or ResampledShards)
    -> split by node -> split by worker          (only if shards >= ranks x workers, not resampled)
    -> read tar (safe keys, truncation detected)
    -> split samples by rank x worker            (only if shards < ranks x workers, not resampled)
    -> count seen, reject flagged -> shuffle buffer -> decode -> encode -> [pack] -> batch

With a `Packer` (vlm.data.packing) the encoded samples are packed into rows of several samples
before batching; it is deterministic, so all that is said below of batches holds for packed ones.

Splitting: with enough shards each worker of each rank reads whole shards of its own. With fewer
shards than ranks x workers (a one-shard validation set on 8 ranks) every worker reads every shard,
in the same seeded order, and keeps every (ranks x workers)-th sample: no sample is lost or read
twice, and each worker counts only the samples it keeps. Resampled pipelines draw shards per worker.

Deterministic: for a given seed, epoch, rank, worker, world size and worker count the batches are
always the same.

`handler` decides what a bad sample does: "strict" raises a `SampleError` naming the shard file and
sample key; "skip" drops it, counts it by reason in a `SkipCounter`, and raises
`TooManySkipsError` once the skipped fraction passes `max_skip_fraction` (after
`min_samples_before_abort` samples). Nothing here ever sleeps.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import glob
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from vlm.data.collate import Collator
from vlm.data.decode import DEFAULT_MAX_PIXELS, SKIP_REASONS, SampleError, decode_sample, iter_shard_samples
from vlm.data.formats import EncodedSample, encode_sample
from vlm.data.packing import Packer
from vlm.data.features import FeatureStore
from vlm.text.chat import ChatTemplate

HANDLERS = ("strict", "skip")
log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """How shards are read and batched (validated on construction).

    shards: shard paths, or one brace pattern such as "data/train-{000000..000009}.tar".
    batch_size: samples per batch; partial_batches keeps the last, smaller batch of a stream.
    shuffle: shuffle the shard order (by seed and epoch) and samples through a buffer of
        `shuffle_buffer` samples (a buffer < 2 means shard order only).
    resampled: draw shards with replacement forever (multi-epoch runs; bound the run by steps).
    handler: "strict" or "skip" (see the module docstring).
    max_pixels, max_member_bytes: limits on one image and one tar member.
    """

    shards: str | list[str]
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    handler: str = "strict"
    max_skip_fraction: float = 0.05
    min_samples_before_abort: int = 200
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = 64 * 2**20
    partial_batches: bool = True

    def __post_init__(self):
        self.shards = expand_urls(self.shards) if isinstance(self.shards, str) else [str(s) for s in self.shards]
        if not self.shards:
            raise ValueError("PipelineConfig.shards is empty")
        if self.handler not in HANDLERS:
            raise ValueError(f"handler must be one of {HANDLERS}, got {self.handler!r}")
        if self.batch_size < 1 or self.max_pixels < 1 or self.max_member_bytes < 1:
            raise ValueError("batch_size, max_pixels and max_member_bytes must be >= 1")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")


class TooManySkipsError(RuntimeError):
    """Raised in skip mode when the skipped fraction passes the configured limit."""


class SkipCounter:
    """Samples seen and skipped per reason, shared by the DataLoader workers of one process.

    The counts live in shared memory, so the main process reads what its workers counted (after
    or during iteration). Counts are per rank; sum them across ranks to get a global figure.
    """

    def __init__(self):
        self._counts = multiprocessing.Array("q", 1 + len(SKIP_REASONS))  # [seen, *per reason]

    def add_seen(self, count: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[0] += count

    def add_skip(self, reason: str) -> None:
        index = 1 + SKIP_REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[index] += 1

    @property
    def seen(self) -> int:
        return int(self._counts[0])

    @property
    def skipped(self) -> int:
        return int(sum(self._counts[1:]))

    def counts(self) -> dict[str, int]:
        """Skips per reason, only the reasons that occurred."""
        values = self._counts[1:]
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, values) if n}

    def as_dict(self) -> dict[str, int]:
        """Flat numbers for a metrics logger: seen, skipped, and skipped/<reason> per reason."""
        return {"seen": self.seen, "skipped": self.skipped,
                **{f"skipped/{reason}": n for reason, n in self.counts().items()}}

    def reset(self) -> None:
        with self._counts.get_lock():
            self._counts[:] = [0] * len(self._counts)

    def summary(self) -> str:
        """One loggable line, e.g. "skipped 3 of 120 samples (2.5%): corrupt image 2, truncated shard 1"."""
        seen, skipped = self.seen, self.skipped
        share = f" ({skipped / seen:.1%})" if seen else ""
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.counts().items())
        return f"skipped {skipped} of {seen} samples{share}" + (f": {reasons}" if reasons else "")


class SampleHandler:
    """Applies the handler policy to rejected samples. One per pipeline (per worker)."""

    _LOUD_SKIPS = 10  # per process, a warning each; later skips are logged at info level

    def __init__(self, config: PipelineConfig, counter: SkipCounter):
        self.config, self.counter = config, counter
        self._logged = 0

    def reject(self, error: SampleError) -> None:
        """strict: raise `error`; skip: count it, then abort if too large a fraction was skipped."""
        if self.config.handler == "strict":
            raise error
        self.counter.add_skip(error.reason)
        self._logged += 1
        log.log(logging.WARNING if self._logged <= self._LOUD_SKIPS else logging.INFO, "skipped: %s", error)
        seen, skipped = self.counter.seen, self.counter.skipped
        if seen >= self.config.min_samples_before_abort and skipped > self.config.max_skip_fraction * seen:
            raise TooManySkipsError(f"{self.counter.summary()}, above max_skip_fraction "
                                    f"{self.config.max_skip_fraction:.1%}; last: {error}")

    def check(self, samples: Iterable[dict]) -> Iterator[dict]:
        """Stage: count every raw sample as seen; reject those the reader flagged (unsafe key,
        truncated shard, ...). It comes after the sample split, so a worker counts only its own."""
        for sample in samples:
            self.counter.add_seen()
            if "__error__" in sample:
                self.reject(sample["__error__"])
            else:
                yield sample

    def map(self, samples: Iterable[dict], fn: Callable[[dict], Any]) -> Iterator[Any]:
        """Stage: `fn` on every sample; a SampleError rejects that sample."""
        for sample in samples:
            try:
                result = fn(sample)
            except SampleError as error:
                self.reject(error.located(key=sample.get("__key__"), url=sample.get("__url__")))
                continue
            yield result


def read_tar_samples(sources: Iterable[dict], *, max_member_bytes: int) -> Iterator[dict]:
    """Stage: {"url": shard} -> raw samples {"__key__", "__url__", member: bytes, ...}.

    Samples the reader flagged (unsafe key, truncated shard, ...) are yielded too, with
    "__error__", for `SampleHandler.check`. A shard that cannot be opened is an error in both modes.
    """
    for source in sources:
        stream = gopen(source["url"])
        try:
            yield from iter_shard_samples(stream, source["url"], max_member_bytes=max_member_bytes)
        finally:
            stream.close()


def _seeded(*parts: Any) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))  # str seeds hash stably (sha512)


def split_by_node(sources: Iterable[dict], *, rank: int, world_size: int) -> Iterator[dict]:
    """Stage: every world_size-th shard, starting at rank."""
    return islice(sources, rank, None, world_size)


def split_by_worker(sources: Iterable[dict], *, worker: int, num_workers: int) -> Iterator[dict]:
    """Stage: every num_workers-th shard, starting at worker."""
    return islice(sources, worker, None, num_workers)


def split_samples(samples: Iterable[dict], *, rank: int, world_size: int, worker: int,
                  num_workers: int) -> Iterator[dict]:
    """Stage: every (world_size * num_workers)-th sample, starting at rank * num_workers + worker."""
    return islice(samples, rank * num_workers + worker, None, world_size * num_workers)


def shares_shards(config: PipelineConfig, *, world_size: int = 1, num_workers: int = 1) -> bool:
    """Whether the workers of all ranks read every shard and split its samples: a pipeline that is
    not resampled and has fewer shards than ranks x workers (else some workers would get nothing)."""
    return not config.resampled and len(config.shards) < world_size * num_workers


def shard_stages(config: PipelineConfig, *, rank: int = 0, world_size: int = 1, worker: int = 0,
                 num_workers: int = 1, epoch: int = 0) -> list:
    """The stages that choose this worker's shards, yielding {"url": path}."""
    if config.resampled:  # every worker draws its own endless sequence; no split needed
        return [wds.ResampledShards(config.shards, seed=_seeded("resample", config.seed, epoch).getrandbits(31),
                                    worker_seed=lambda: rank * num_workers + worker, deterministic=True)]
    order_seed = f"shards/{config.seed}/{epoch}" if config.shuffle else None  # same on every rank
    if shares_shards(config, world_size=world_size, num_workers=num_workers):
        return [wds.SimpleShardList(config.shards, seed=order_seed)]  # samples are split after reading
    return [
        wds.SimpleShardList(config.shards, seed=order_seed),
        partial(split_by_node, rank=rank, world_size=world_size),
        partial(split_by_worker, worker=worker, num_workers=num_workers),
    ]


def build_pipeline(
    config: PipelineConfig,
    template: ChatTemplate,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    collator: Collator,
    counter: SkipCounter | None = None,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    epoch: int = 0,
    features: FeatureStore | None = None,
    packer: Packer | None = None,
) -> wds.DataPipeline:
    """The pipeline of one worker of one rank, yielding `Batch`es. With `features` (a cache of the
    frozen tower's outputs), images become their cached features and `transform` is not used. With
    `packer`, each batch row is a `PackedRow` of several samples."""
    handler = SampleHandler(config, counter if counter is not None else SkipCounter())
    encode: Callable[[dict], EncodedSample] = partial(encode_sample, template=template,
                                                      transform=None if features is not None else transform)
    stages = shard_stages(config, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers, epoch=epoch)
    stages.append(partial(read_tar_samples, max_member_bytes=config.max_member_bytes))
    if shares_shards(config, world_size=world_size, num_workers=num_workers):
        stages.append(partial(split_samples, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers))
    stages.append(handler.check)
    if config.shuffle and config.shuffle_buffer > 1:
        rng = _seeded("samples", config.seed, epoch, rank, worker)
        stages.append(wds.shuffle(config.shuffle_buffer, initial=min(100, config.shuffle_buffer), rng=rng))
    if features is not None:
        stages.append(partial(handler.map, fn=features.substitute))
    stages += [
        partial(handler.map, fn=partial(decode_sample, max_pixels=config.max_pixels)),
        partial(handler.map, fn=encode),
        *([packer] if packer is not None else []),
        wds.batched(config.batch_size, collation_fn=collator, partial=config.partial_batches),
    ]
    return wds.DataPipeline(stages)


def node_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): as given, else from torch.distributed if initialised, else RANK /
    WORLD_SIZE from the environment, else (0, 1)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, got {rank}, {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


class ShardDataset(IterableDataset):
    """An IterableDataset of `Batch`es; each DataLoader worker runs its own `build_pipeline`.

    The rank is resolved at construction (see `node_info`); call `set_epoch` before each epoch
    so that shard order and shuffling change (the DataLoader must not use persistent workers).
    """

    def __init__(self, config: PipelineConfig, template: ChatTemplate, *, transform: Callable, collator: Collator,
                 counter: SkipCounter | None = None, rank: int | None = None, world_size: int | None = None,
                 features: FeatureStore | None = None, packer: Packer | None = None):
        super().__init__()
        self.config, self.template, self.transform, self.collator = config, template, transform, collator
        self.features, self.packer = features, packer
        self.counter = counter if counter is not None else SkipCounter()
        self.rank, self.world_size = node_info(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pipeline = build_pipeline(self.config, self.template, transform=self.transform, collator=self.collator,
                                  counter=self.counter, rank=self.rank, world_size=self.world_size,
                                  worker=worker, num_workers=num_workers, epoch=self.epoch, features=self.features,
                                  packer=self.packer)
        return iter(pipeline)


def build_dataloader(config: PipelineConfig, template: ChatTemplate, *, transform: Callable, collator: Collator,
                     num_workers: int = 2, counter: SkipCounter | None = None, rank: int | None = None,
                     world_size: int | None = None, pin_memory: bool = False,
                     features: FeatureStore | None = None, packer: Packer | None = None) -> DataLoader:
    """A DataLoader over a `ShardDataset` (batching happens in the workers, so batch_size=None).

    `loader.dataset.set_epoch(e)` changes the shuffling; `loader.dataset.counter` has the skips.
    """
    dataset = ShardDataset(config, template, transform=transform, collator=collator, counter=counter,
                           rank=rank, world_size=world_size, features=features, packer=packer)
    if shares_shards(config, world_size=dataset.world_size, num_workers=max(num_workers, 1)):
        log.info("%d shard(s) for %d rank(s) x %d worker(s): every worker reads every shard and keeps its "
                 "share of the samples", len(config.shards), dataset.world_size, max(num_workers, 1))
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False)


def expand_shards(patterns: str | list[str]) -> list[str]:
    """Globs and brace patterns -> sorted shard paths."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else expand_urls(pattern)
        paths += matches
    return paths
