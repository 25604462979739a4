"""`vlm fit|validate|test|predict --config A.yaml --config B.yaml ...` through LightningCLI.

Recipes compose: a dataset file, a fusion file, optional strategy/precision files; later files
and command-line flags override earlier ones. `--ckpt_path last` resumes from the newest complete
checkpoint in the ModelCheckpoint directory (or starts fresh when there is none).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vlm.training.callbacks import TrainingState
from vlm.training.checkpointing import AtomicCheckpointIO, latest_complete_checkpoint
from vlm.training.datamodule import VLMDataModule
from vlm.training.module import VLMModule

log = logging.getLogger(__name__)


class VLMCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        # Recipes write ${model.config.fusion.name}: paths from the subcommand's root, not "fit.".
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(
            VLMModule,
            VLMDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},  # a second run in the same directory is fine
            # ${...} interpolation over the merged recipe, e.g. output folders named after the fusion
            parser_kwargs={"parser_mode": "omegaconf+"},
            **kwargs,
        )

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(cb, TrainingState) for cb in trainer.callbacks):
            trainer.callbacks.append(TrainingState())
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def fit(self, model: VLMModule, datamodule: VLMDataModule | None = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        if ckpt_path == "last":
            ckpt_path = self._resolve_last()
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    def _resolve_last(self) -> str | None:
        dirs = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        if not dirs:
            raise ValueError("--ckpt_path last needs a ModelCheckpoint with an explicit dirpath in the recipe")
        found = [path for path in map(latest_complete_checkpoint, dirs) if path is not None]
        if not found:
            log.warning("--ckpt_path last: no complete checkpoint in %s; starting from scratch", dirs)
            return None
        newest = max(found, key=lambda p: p.stat().st_mtime_ns)
        log.info("resuming from %s", newest)
        return str(newest)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    VLMCLI(args=argv)
    return 0
