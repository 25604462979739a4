"""Run a frozen vision tower once over shards and cache its outputs (`vlm features build`).

Training a fusion or a decoder on top of a frozen tower recomputes the same tower outputs every
epoch; at 224 px the tower is most of a CPU step. `build_features` stores them once, keyed by sample
key and image member (layout in `vlm.data.features`), in the dtype training computes them in; a
recipe with `data.features: DIR` then reads them instead of decoding, transforming and encoding
images. The cache records a fingerprint of what made it (tower config, a hash of its weights, the
transform, the dtype, the output shape); training refuses a cache whose fingerprint differs from
its model's, a tower that trains, and a random (augmenting) train transform.

Building is resumable (finished shards are kept, an interrupted shard starts again) and atomic per
file (written under a temporary name, then renamed). Bad samples are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from vlm.data.decode import DEFAULT_MAX_PIXELS, SampleError, split_member_name, decode_sample, iter_shard_samples
from vlm.data.features import FINGERPRINT_FILE, FORMAT, check_fingerprint, is_image_member, shard_id, tensor_name
from vlm.errors import UserError

log = logging.getLogger(__name__)

PART_BYTES = 256 * 2**20  # a part file holds at most this many bytes of features
_NOT_FINGERPRINTED = ("pretrained", "checkpoint_path", "frozen", "augment")  # the weights hash covers the first two


def precision_dtype(precision: str | int | None) -> torch.dtype:
    """The dtype a Lightning precision setting computes a frozen tower's outputs in."""
    text = str(precision or "32")
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32


def _autocasts(precision: str | int | None) -> bool:
    return str(precision or "").endswith("-mixed")


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of `module`'s state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if hasattr(tensor, "full_tensor"):  # a sharded DTensor: every rank gathers the same whole tensor
            tensor = tensor.full_tensor()
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint(model: torch.nn.Module, precision: str | int | None) -> dict[str, Any]:
    """What a cache made with `model`'s tower under `precision` is valid for."""
    vision = model.vision
    config = {key: value for key, value in model.config.vision.to_dict().items() if key not in _NOT_FINGERPRINTED}
    transform = vision.transform
    return {"format": FORMAT, "vision": config, "weights_sha256": weights_hash(vision),
            "image_size": vision.image_size, "transform": {"mean": list(transform.mean), "std": list(transform.std),
                                                           "resize": transform.resize},
            "dtype": str(precision_dtype(precision)).removeprefix("torch."),
            "num_tokens": vision.num_tokens, "dim": vision.dim}


def check_cacheable(model: torch.nn.Module, *, train_transform: Any = None) -> None:
    """UserError unless the tower is frozen and the transform deterministic: otherwise cached
    outputs would not be what training computes."""
    vision = model.vision
    trainable = [name for name, p in vision.named_parameters() if p.requires_grad]
    if trainable:
        raise UserError(f"data.features: the vision tower trains (e.g. vision.{trainable[0]}; model.stage full or an "
                        "include pattern): its outputs change during training and cannot be cached; use stage "
                        "align or instruct, or drop data.features")
    transform = train_transform if train_transform is not None else getattr(vision, "train_transform", vision.transform)
    if getattr(transform, "random", False):
        raise UserError("data.features: the train image transform is random (model.config.vision.augment is set): "
                        "cached features would freeze one draw of the augmentation; drop augment or data.features")


@dataclass
class BuildReport:
    """What one `build_features` call did."""

    shards_built: int = 0
    shards_kept: int = 0  # finished by an earlier call
    samples: int = 0  # samples cached by this call
    images: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> samples skipped by this call
    first_errors: dict[str, str] = field(default_factory=dict)  # reason -> first message

    def summary(self) -> str:
        skips = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.shards_built} shard(s) built, {self.shards_kept} already done; {self.samples} samples, "
                f"{self.images} images cached; skipped: {skips}")


@torch.no_grad()
def build_features(model: torch.nn.Module, shards: Sequence[str | Path], out: str | Path, *,
                   precision: str | int | None = "32-true", batch_size: int = 64, overwrite: bool = False,
                   progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> BuildReport:
    """Cache `model.vision`'s outputs for every image of `shards` in `out` (see the module docstring).

    An existing cache of another fingerprint is refused unless `overwrite` (then it is emptied);
    one of the same fingerprint is completed: finished shards are kept.
    """
    check_cacheable(model, train_transform=model.vision.transform)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    shards = [str(s) for s in shards]
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise UserError(f"--data: no shard at {missing[:3] if missing else 'the given pattern'}")
    out = Path(out)
    expected = fingerprint(model, precision)
    _prepare_directory(out, expected, overwrite=overwrite)
    report = BuildReport()
    vision = model.vision
    was_training = vision.training
    vision.eval()
    try:
        with tqdm(total=_sample_count(shards), unit="sample", desc="features", disable=not progress) as bar:
            for shard in shards:
                record = out / f"{shard_id(shard)}.shard.json"
                if record.is_file():
                    report.shards_kept += 1
                    bar.update(json.loads(record.read_text())["samples"])
                    continue
                _build_shard(model, shard, out, precision=precision, batch_size=batch_size, bar=bar,
                             report=report, max_pixels=max_pixels)
                report.shards_built += 1
    finally:
        vision.train(was_training)
    return report


def _prepare_directory(out: Path, expected: dict[str, Any], *, overwrite: bool) -> None:
    path = out / FINGERPRINT_FILE
    if path.is_file() and not overwrite:
        check_fingerprint(json.loads(path.read_text()), expected, where=str(out))
        return
    if out.exists() and any(out.iterdir()) and not path.is_file() and not overwrite:
        raise UserError(f"--out {out} exists and is not a feature cache; choose an empty folder or add --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for stale in [*out.glob("*.safetensors"), *out.glob("*.shard.json"), out / FINGERPRINT_FILE]:
            stale.unlink(missing_ok=True)
    _write_atomic(path, json.dumps(expected, indent=1, sort_keys=True).encode())


def _build_shard(model, shard: str, out: Path, *, precision, batch_size: int, bar, report: BuildReport,
                 max_pixels: int) -> None:
    name = shard_id(shard)
    for stale in out.glob(f"{name}.*.safetensors"):  # an interrupted earlier attempt
        stale.unlink()
    dtype = precision_dtype(precision)
    parts: list[str] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, samples, seen = 0, 0, set()

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        part = f"{name}.{len(parts):05d}.safetensors"
        tmp = out / f".{part}.tmp"
        save_file(pending, tmp, metadata={"shard": shard})
        os.replace(tmp, out / part)
        parts.append(part)
        pending, pending_bytes = {}, 0

    batch_names: list[str] = []
    batch_pixels: list[torch.Tensor] = []

    def encode_batch() -> None:
        nonlocal pending_bytes
        if not batch_pixels:
            return
        features = _encode(model, torch.stack(batch_pixels), precision, dtype)
        for tensor_key, tensor in zip(batch_names, features):
            pending[tensor_key] = tensor.clone()
            pending_bytes += tensor.numel() * tensor.element_size()
        batch_names.clear()
        batch_pixels.clear()
        if pending_bytes >= PART_BYTES:
            flush()

    for images, key in _shard_images(shard, report, max_pixels=max_pixels):
        bar.update(1)
        if key in seen:
            _skip(report, "bad sample", f"{shard}: sample {key!r} appears twice; sample keys must be unique")
            continue
        seen.add(key)
        samples += 1
        for member, image in images:
            batch_names.append(tensor_name(key, member))
            batch_pixels.append(model.vision.transform(image))
            report.images += 1
            if len(batch_pixels) == batch_size:
                encode_batch()
    encode_batch()
    flush()
    report.samples += samples
    record = {"shard": str(Path(shard).resolve()), "samples": samples, "parts": parts}
    _write_atomic(out / f"{name}.shard.json", json.dumps(record, indent=1).encode())


def _encode(model, pixels: torch.Tensor, precision, dtype: torch.dtype) -> torch.Tensor:
    """The tower's outputs for `pixels` as training computes them: in the weights' dtype, under
    autocast for a mixed precision; returned in `dtype` on the CPU."""
    weight = next(model.vision.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    pixels = pixels.to(device, weight.dtype if weight is not None else pixels.dtype)
    mixed = _autocasts(precision) and dtype != torch.float32
    with torch.autocast(device.type, dtype=dtype) if mixed else nullcontext():
        features = model.vision(pixels)
    return features.to(dtype).cpu()


def _shard_images(shard: str, report: BuildReport, *, max_pixels: int) -> Iterator[tuple[list[tuple[str, Any]], str]]:
    """(image members as (name, PIL image), sample key) of every readable sample of `shard`;
    unreadable samples are counted in `report`."""
    with open(shard, "rb") as stream:
        for raw in iter_shard_samples(stream, shard, max_member_bytes=2**31):
            if "__error__" in raw:
                error = raw["__error__"]
                _skip(report, error.reason, str(error))
                continue
            images = {name: value for name, value in raw.items() if is_image_member(name)}
            try:
                decoded = decode_sample({**images, "__key__": raw["__key__"], "__url__": shard}, max_pixels=max_pixels)
            except SampleError as error:
                _skip(report, error.reason, str(error))
                continue
            yield [(name, decoded[name]) for name in sorted(images)], raw["__key__"]


def _skip(report: BuildReport, reason: str, message: str) -> None:
    report.skipped[reason] += 1
    report.first_errors.setdefault(reason, message)
    log.warning("skipped: %s", message)


def _sample_count(shards: Sequence[str]) -> int | None:
    """Samples in `shards`, from their tar headers alone (distinct keys); None if a shard is unreadable."""
    total = 0
    for shard in shards:
        try:
            with tarfile.open(shard) as archive:
                total += len({split_member_name(member.name)[0] for member in archive if member.isfile()})
        except (OSError, tarfile.TarError):
            return None
    return total


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
