"""Checkpoints: written atomically, read with weights_only=True, and `last` resolved to the newest
checkpoint that is complete (a truncated file or a half-written sharded directory is never picked).

A sharded checkpoint (FSDP1 `state_dict_type: sharded`, FSDP2 `save_distributed_checkpoint`) is a
directory: one `*.distcp` file per rank, `.metadata` (written by rank 0 once every rank's shard is
written) and `meta.pt` (the rest of the training state, written by rank 0 last). The vlm strategies
delete `meta.pt` before rewriting a directory, so a directory is complete exactly when `.metadata`
exists and `meta.pt` is a complete torch file.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<name>.tmp`, fsync, then rename: a crash leaves the old file or none, never half."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not is_complete(path):
            what = "does not exist" if not Path(path).exists() else "is not a complete checkpoint (truncated or not a torch zip file)"
            raise ValueError(f"{path}: {what}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def is_complete(path: str | os.PathLike) -> bool:
    """A complete checkpoint file (a torch zip with its central directory) or sharded directory."""
    path = Path(path)
    if path.is_dir():
        return (path / SHARDED_INDEX).is_file() and is_complete(path / SHARDED_META)
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


SHARDED_INDEX, SHARDED_META = ".metadata", "meta.pt"


def written_at(path: Path) -> int:
    """When a checkpoint was finished: its file's mtime, or its sharded directory's meta.pt's."""
    return (path / SHARDED_META if path.is_dir() else path).stat().st_mtime_ns


def latest_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The most recently written complete `*.ckpt` (file or sharded directory) in `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = []
    for path in directory.glob("*.ckpt"):
        if is_complete(path):
            candidates.append(path)
        else:
            log.warning("skipping incomplete checkpoint %s", path)
    return max(candidates, key=written_at, default=None)


def start_sharded_save(path: Path) -> None:
    """Before rewriting a sharded directory (rank 0, before the shards' collective save): a crash
    in the middle then leaves a directory without meta.pt, which is never resumed from."""
    for name in (SHARDED_META, SHARDED_INDEX):
        (path / name).unlink(missing_ok=True)


def read_sharded_model_state(path: str | os.PathLike, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VisionLanguageModel weights of a sharded directory (FSDP2: under `state_dict`, FSDP1:
    under `model`), read whole in this process into copies of `template`'s tensors (model keys)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path}: not a complete sharded checkpoint (needs {SHARDED_INDEX} and {SHARDED_META})")
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for root in ("state_dict", "model"):
        names = {_clean(key.removeprefix(f"{root}.model.")): key for key in stored if key.startswith(f"{root}.model.")}
        if names:
            break
    else:
        raise ValueError(f"{path}: no model weights in this sharded checkpoint (no 'state_dict' or 'model' entry)")
    missing, unexpected = sorted(set(template) - set(names)), sorted(set(names) - set(template))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = {name: template[name].detach().clone() for name in template}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({root: {names[name].removeprefix(f"{root}."): tensor for name, tensor in state.items()}},
                 checkpoint_id=str(path), no_dist=True)
    return state


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The non-tensor training state of a checkpoint file or sharded directory (weights_only)."""
    path = Path(path)
    if not is_complete(path):
        kind = "sharded checkpoint" if path.is_dir() else "checkpoint"
        what = "does not exist" if not path.exists() else f"is not a complete {kind} (truncated or still being written)"
        raise ValueError(f"{path}: {what}")
    return torch.load(path / SHARDED_META if path.is_dir() else path, map_location="cpu", weights_only=True)
