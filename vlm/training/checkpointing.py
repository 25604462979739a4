"""Checkpoint files: written atomically, read with weights_only=True, and `last` resolved to the
newest checkpoint that is complete (a truncated file is never picked)."""

from __future__ import annotations

import logging
import os
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
            raise ValueError(f"{path}: not a complete checkpoint (truncated or not a torch zip file)")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def is_complete(path: str | os.PathLike) -> bool:
    """A torch checkpoint is a zip file; a truncated one has lost its central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def latest_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The most recently written complete `*.ckpt` in `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if is_complete(path):
            return path
        log.warning("skipping incomplete checkpoint %s", path)
    return None
