"""A cache of a frozen vision tower's outputs, keyed by sample key and image member.

Layout of a cache directory (written by `vlm features build`, read by `data.features`):

    fingerprint.json                    what made the features: tower config, weights hash, transform, dtype, shape
    <shard>-<hash>.shard.json           one per finished shard: its parts, samples, skips (written last)
    <shard>-<hash>.<part>.safetensors   tensors named "<sample key>/<image member>", each [num_tokens, dim]

A shard's record is written after all its parts, so a shard without one was interrupted and is
built again from its start. Tensors are read with safetensors (no unpickling), lazily, from the
process that asks: a `FeatureStore` can be sent to DataLoader workers.

In the pipeline (`FeatureStore.substitute`), each image member of a raw sample is replaced by its
cached tensor before decoding, so images are neither decoded nor transformed, and the images of
an encoded sample are tensors [num_tokens, dim] in the order the sample format uses them.
`FeatureCollator` then makes batches that always say they come from the cache, images or not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from vlm.data.decode import IMAGE_EXTENSIONS, SampleError, member_extension
from vlm.errors import UserError

if TYPE_CHECKING:
    from vlm.data.collate import Batch, Collator

FORMAT = 1
FINGERPRINT_FILE = "fingerprint.json"


def shard_id(shard: str | Path) -> str:
    """The name of a shard's files in a cache: its file name and a hash of its resolved path (two
    `train-000000.tar` of different folders stay apart)."""
    path = Path(shard)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{path.name.removesuffix('.tar')}-{digest}"


def tensor_name(key: str, member: str) -> str:
    return f"{key}/{member}"


def is_image_member(name: str) -> bool:
    return not name.startswith("__") and member_extension(name) in IMAGE_EXTENSIONS


class FeatureStore:
    """Read side of a feature cache directory.

    Args:
        root: the cache directory.
        expected: the fingerprint the caller's model gives (`vlm.features.fingerprint`); a cache
            made by anything else is refused, naming the fields that differ. None skips the check.
    """

    def __init__(self, root: str | Path, *, expected: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        path = self.root / FINGERPRINT_FILE
        if not path.is_file():
            raise UserError(f"data.features: {self.root} is not a feature cache (no {FINGERPRINT_FILE}); "
                            "make one with `vlm features build --config RECIPE --data 'SHARDS' --out DIR`")
        self.fingerprint = json.loads(path.read_text())
        if self.fingerprint.get("format") != FORMAT:
            raise UserError(f"data.features: {path} has format {self.fingerprint.get('format')!r}, "
                            f"this vlm reads format {FORMAT}; build the cache again")
        if expected is not None:
            check_fingerprint(self.fingerprint, expected, where=str(self.root))
        self.files: dict[str, str] = {}  # tensor name -> part file name
        self.members: dict[str, list[str]] = {}  # sample key -> its image members with features
        self.samples = 0
        for record_path in sorted(self.root.glob("*.shard.json")):
            record = json.loads(record_path.read_text())
            self.samples += int(record["samples"])
            for part in record["parts"]:
                with safe_open(self.root / part, framework="pt") as handle:
                    for name in handle.keys():
                        if name in self.files:
                            raise UserError(f"data.features: {self.root} holds sample/image {name!r} twice "
                                            f"({self.files[name]} and {part}); sample keys must be unique")
                        self.files[name] = part
                        key, _, member = name.rpartition("/")
                        self.members.setdefault(key, []).append(member)
        if not self.files:
            raise UserError(f"data.features: {self.root} has no finished shard; run `vlm features build` again")
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # open files stay in the process that opened them
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self.files)

    def get(self, key: str, member: str) -> torch.Tensor:
        """The cached [num_tokens, dim] tensor of image `member` of sample `key`; SampleError if absent."""
        name = tensor_name(key, member)
        part = self.files.get(name)
        if part is None:
            raise SampleError(f"image {member} has no cached features in {self.root} (the cache was built from "
                              "other shards: run `vlm features build` over these shards too)",
                              reason="no cached features")
        handle = self._handles.get(part)
        if handle is None:
            handle = self._handles[part] = safe_open(self.root / part, framework="pt")
        return handle.get_tensor(name)

    def substitute(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Pipeline stage: a raw sample whose image members (bytes) are replaced by their features."""
        out = dict(sample)
        for name in sample:
            if is_image_member(name):
                out[name] = self.get(sample["__key__"], name)
        return out


class FeatureCollator:
    """Collation of cached features: `collator`'s batches (it collates features), where a batch
    without images still has `image_features`, empty: [0, num_tokens, dim] in the cache's dtype.

    The model makes the blank image of such a batch from features, not with the tower: in a
    features run no rank runs the tower in training, and under sharding (FSDP2) every rank must
    run the same collectives, whether its batch has images or not."""

    def __init__(self, collator: Collator, store: FeatureStore) -> None:
        if not collator.features:
            raise ValueError("FeatureCollator needs a Collator(features=True)")
        self.collator = collator
        fingerprint = store.fingerprint
        self.empty_shape = (0, int(fingerprint["num_tokens"]), int(fingerprint["dim"]))
        self.dtype = getattr(torch, fingerprint["dtype"])

    def __call__(self, samples: list) -> Batch:
        batch = self.collator(samples)
        if batch.image_features is None:
            batch.image_features = torch.zeros(self.empty_shape, dtype=self.dtype)
        return batch


def check_fingerprint(found: Mapping[str, Any], expected: Mapping[str, Any], *, where: str) -> None:
    """UserError naming every field where the cache's fingerprint differs from the model's."""
    found, expected = _plain(found), _plain(expected)
    differs = [key for key in sorted(set(found) | set(expected)) if found.get(key) != expected.get(key)]
    if not differs:
        return
    details = "; ".join(f"{key}: cache {_short(found.get(key))}, model {_short(expected.get(key))}" for key in differs)
    raise UserError(f"data.features: {where} was made by another tower, checkpoint, image size or precision "
                    f"({details}); build a cache for this recipe with `vlm features build`")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
