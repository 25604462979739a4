"""`vlm fit|validate|test|predict --config A.yaml --config B.yaml ...` through LightningCLI.

Recipes compose: a dataset file, a fusion file, optional strategy/precision files; later files
and command-line flags override earlier ones. `--ckpt_path last` means the newest complete
checkpoint (file or sharded directory) in the ModelCheckpoint directory: `fit` resumes from it (or
starts fresh when there is none); `validate`, `test` and `predict` load it. `fit` refuses to write
into a checkpoint directory that holds an earlier run's checkpoints unless it resumes
(`--ckpt_path last`) or is told `--overwrite` (which deletes them first).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vlm.errors import UserError
from vlm.training.callbacks import CaptionWriter, TrainingState
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
            save_config_kwargs={"overwrite": True},  # the run folder itself is guarded in fit()
            # ${...} interpolation over the merged recipe, e.g. output folders named after the fusion
            parser_kwargs={"parser_mode": "omegaconf+"},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--overwrite", action="store_true",
                            help="fit: delete the checkpoints of an earlier run in the checkpoint directory first")
        parser.add_argument("--predictions", default=None,
                            help="predict: the JSONL file to write (default: <trainer.default_root_dir>/predictions.jsonl)")

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(cb, TrainingState) for cb in trainer.callbacks):
            trainer.callbacks.append(TrainingState())
        if self.subcommand == "predict" and not any(isinstance(cb, CaptionWriter) for cb in trainer.callbacks):
            path = self.config["predict"].get("predictions") or Path(trainer.default_root_dir) / "predictions.jsonl"
            trainer.callbacks.append(CaptionWriter(path))
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def fit(self, model: VLMModule, datamodule: VLMDataModule | None = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        if ckpt_path == "last":
            ckpt_path = self._resolve_last(required=False)
        elif _is_launcher_process():
            self._guard_output(overwrite=bool(self.config["fit"].get("overwrite")))
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    def validate(self, model: VLMModule, datamodule: VLMDataModule | None = None, ckpt_path: str | None = None, **kwargs: Any):
        return self.trainer.validate(model, datamodule=datamodule, ckpt_path=self._checkpoint(ckpt_path), **kwargs)

    def test(self, model: VLMModule, datamodule: VLMDataModule | None = None, ckpt_path: str | None = None, **kwargs: Any):
        return self.trainer.test(model, datamodule=datamodule, ckpt_path=self._checkpoint(ckpt_path), **kwargs)

    def predict(self, model: VLMModule, datamodule: VLMDataModule | None = None, ckpt_path: str | None = None, **kwargs: Any):
        kwargs["return_predictions"] = False  # CaptionWriter writes them
        return self.trainer.predict(model, datamodule=datamodule, ckpt_path=self._checkpoint(ckpt_path), **kwargs)

    def _checkpoint(self, ckpt_path: str | None) -> str | None:
        if ckpt_path == "last":
            return self._resolve_last(required=True)
        if ckpt_path is not None and not Path(ckpt_path).exists():
            raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint")
        return ckpt_path

    def _checkpoint_dirs(self) -> list[Path]:
        return [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]

    def _resolve_last(self, *, required: bool) -> str | None:
        dirs = self._checkpoint_dirs()
        if not dirs:
            raise UserError("--ckpt_path last needs a ModelCheckpoint with an explicit dirpath in the recipe")
        found = [path for path in map(latest_complete_checkpoint, dirs) if path is not None]
        if not found:
            if required:
                raise UserError(f"--ckpt_path last: no complete checkpoint in {', '.join(map(str, dirs))}")
            log.warning("--ckpt_path last: no complete checkpoint in %s; starting from scratch", [str(d) for d in dirs])
            return None
        newest = max(found, key=lambda p: (p / "meta.pt" if p.is_dir() else p).stat().st_mtime_ns)
        log.info("resuming from %s", newest)
        return str(newest)

    def _guard_output(self, *, overwrite: bool) -> None:
        """A new run never mixes its checkpoints with an earlier run's: `last.ckpt` must be its own."""
        for folder in self._checkpoint_dirs():
            earlier = sorted(p for p in folder.glob("*.ckpt*")) if folder.is_dir() else []
            if not earlier:
                continue
            if not overwrite:
                names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
                raise UserError(f"{folder} already holds checkpoints of an earlier run ({names}): resume it with "
                                "--ckpt_path last, replace it with --overwrite, or write elsewhere with "
                                "--trainer.default_root_dir DIR")
            log.warning("--overwrite: deleting %d earlier checkpoint(s) in %s", len(earlier), folder)
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _is_launcher_process() -> bool:
    """True in the process a user started (not in the ranks Lightning or torchrun start)."""
    return all(int(os.environ.get(name, "0")) == 0 for name in ("LOCAL_RANK", "RANK", "NODE_RANK"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    VLMCLI(args=argv)
    return 0
