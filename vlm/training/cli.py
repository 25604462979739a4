"""`vlm fit|validate|test|predict --config A.yaml --config B.yaml ...` through LightningCLI.

Recipes compose: a dataset file, a fusion file, optional strategy/precision files; later files
and command-line flags override earlier ones. `--ckpt_path last` means the newest complete
checkpoint (file or sharded directory) in the ModelCheckpoint directory: `fit` resumes from it (or
starts fresh when there is none); `validate`, `test` and `predict` load it. `fit` refuses to write
into a checkpoint directory that holds an earlier run's checkpoints unless it resumes
(`--ckpt_path last`) or is told `--overwrite` (which deletes them first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import logging
import os
import re
import shutil
import sys
import time
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from vlm.errors import UserError
from vlm.training.callbacks import CaptionWriter, SaveOnInterrupt, TrainingState
from vlm.training.checkpointing import AtomicCheckpointIO, latest_complete_checkpoint, read_metadata, written_at
from vlm.training.datamodule import VLMDataModule
from vlm.training.module import VLMModule

log = logging.getLogger(__name__)


class VLMCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        quiet_startup()
        # Recipes write ${model.config.fusion.name}: paths from the subcommand's root, not "fit.".
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(
            VLMModule,
            VLMDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},  # the run folder itself is guarded in fit()
            # ${...} interpolation over the merged recipe, e.g. output folders named after the fusion
            parser_kwargs={"parser_mode": "omegaconf+"},
            auto_configure_optimizers=False,  # the optimizer is model.optim (--optimizer would see no parameters)
            **kwargs,
        )

    def parse_arguments(self, parser, args) -> None:
        """jsonargparse prints ~100 lines of usage before a config error; we say it in one line."""
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                super().parse_arguments(parser, args)
        except SystemExit as exit_:
            if exit_.code in (0, None):
                raise
            subcommand = next((a for a in (args or sys.argv[1:]) if not a.startswith("-")), "fit")
            raise UserError(explain_parse_error(captured.getvalue(), list(args or sys.argv[1:]), parser, subcommand)) from None
        sys.stderr.write(captured.getvalue())

    def instantiate_classes(self) -> None:
        """A dataclass-valued key (model.optim, model.preference) whose own validation fails is
        that validation's one-line message, not jsonargparse's union error around a traceback."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = _own_validation_error(error)
            if cause is None:
                raise
            raise UserError(str(cause)) from error

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--overwrite", action="store_true",
                            help="fit: delete the checkpoints of an earlier run in the checkpoint directory first")
        parser.add_argument("--predictions", default=None,
                            help="predict: the JSONL file to write (default: <trainer.default_root_dir>/predictions.jsonl)")

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(cb, TrainingState) for cb in trainer.callbacks):
            trainer.callbacks.append(TrainingState())
        if self.subcommand == "fit" and not any(isinstance(cb, SaveOnInterrupt) for cb in trainer.callbacks):
            trainer.callbacks.append(SaveOnInterrupt())
        if self.subcommand == "predict" and not any(isinstance(cb, CaptionWriter) for cb in trainer.callbacks):
            path = self.config["predict"].get("predictions") or Path(trainer.default_root_dir) / "predictions.jsonl"
            trainer.callbacks.append(CaptionWriter(path))
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def fit(self, model: VLMModule, datamodule: VLMDataModule | None = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        if ckpt_path == "last":
            ckpt_path = self._resolve_last(required=False)
        elif ckpt_path is not None:
            ckpt_path = self._checkpoint(ckpt_path)
        elif _is_launcher_process():
            self._guard_output(overwrite=bool(self.config["fit"].get("overwrite")))
        if ckpt_path is not None and not self._steps_left(ckpt_path):
            return
        kwargs["weights_only"] = True if kwargs.get("weights_only") is None else kwargs["weights_only"]
        started = time.time()
        try:
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        except BaseException:
            if self.trainer.global_step == 0 and self.trainer.is_global_zero:
                _remove_empty_logs(self.trainer, since=started)
            raise

    @property
    def interrupted(self) -> bool:
        """Whether `vlm fit` stopped on SIGINT/SIGTERM (after saving a checkpoint)."""
        return any(isinstance(cb, SaveOnInterrupt) and cb.received is not None for cb in self.trainer.callbacks)

    def _steps_left(self, ckpt_path: str) -> bool:
        """False (and says so) when the checkpoint has already reached trainer.max_steps."""
        done, limit = int(read_metadata(ckpt_path).get("global_step", 0)), self.trainer.max_steps
        if limit is not None and 0 <= limit <= done:
            print(f"vlm fit: {ckpt_path} is already at step {done} (trainer.max_steps {limit}): nothing to train; "
                  "raise --trainer.max_steps to train on", file=sys.stderr)
            return False
        return True

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
        newest = max(found, key=written_at)
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


def explain_parse_error(output: str, args: list[str], parser, subcommand: str) -> str:
    """jsonargparse's `error: ...` as one line: the key at fault, the --config file that holds it,
    and the nearest valid key."""
    message = output.split("error: ", 1)[-1].strip() or "invalid arguments"
    message = " ".join(line.strip() for line in message.splitlines())
    found = re.search(r"""(?:option|key|Key) ["']([\w.]+)["']""", message)
    if found is None:
        return message + f" (vlm {subcommand} --help lists every key)"
    key = found.group(1).removeprefix("--")
    nested = re.search(r"Option '(\w+)' is not accepted", message)  # a typo inside a dataclass-valued key
    if nested:
        key, message = f"{key}.{nested.group(1)}", "does not accept option"
    typed = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*?)(?: - |$)", message)
    arg = re.search(r"NestedArg\(key='(\w+)', val='(.*?)'\)", message)
    if arg:  # a wrong value for a field of a dataclass-valued key, given on the command line
        key = f"{key}.{arg.group(1)}"
        message = f"expected {typed.group(1)}, got {arg.group(2)!r}" if typed else f"invalid value {arg.group(2)!r}"
    elif typed:
        message = f"expected {typed.group(1)}, got {typed.group(2).strip().strip(chr(34))!r}"
    where = next((path for path in reversed(_config_files(args)) if _holds_key(path, key)), None)
    if any(a.split("=", 1)[0] == f"--{key}" for a in args):
        where = "command line"
    subparser = parser._subcommands_action._name_parser_map.get(subcommand, parser)
    valid = [a.dest for a in subparser._actions if a.dest and not a.dest.endswith(".help")]
    for action in subparser._actions:  # fields of dataclass-valued keys such as model.optim
        hint = getattr(action, "_typehint", None)
        for kind in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(kind):
                valid += [f"{action.dest}.{field.name}" for field in dataclasses.fields(kind)]
    unknown = "does not accept" in message or "unrecognized" in message
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75) if unknown else []
    text = f"unknown key {key}" if unknown else f"{key}: " + message.removeprefix(f'Parser key "{key}": ')
    hint = f" (did you mean {close[0]}?)" if close else (f" (vlm {subcommand} --help lists every key)" if unknown else "")
    return f"{where}: {text}{hint}" if where else f"{text}{hint}"


def _own_validation_error(error: BaseException) -> BaseException | None:
    """The ValueError raised by vlm's own code (a config's __post_init__) behind `error`, if any."""
    package = str(Path(__file__).resolve().parents[1])
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
        if isinstance(error, ValueError) and frames and frames[-1].filename.startswith(package):
            return error
        error = error.__cause__ or error.__context__
    return None


def _config_files(args: list[str]) -> list[str]:
    files = [b for a, b in zip(args, args[1:]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def _holds_key(path: str, key: str) -> bool:
    try:
        node = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    parts = key.split(".")
    if node and parts[0] in ("fit", "validate", "test", "predict") and parts[0] not in node:
        parts = parts[1:]
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _remove_empty_logs(trainer, *, since: float) -> None:
    """A run that failed before its first step leaves no log folder behind (only ones it made)."""
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None)
        if folder and Path(folder).is_dir() and Path(folder).stat().st_mtime >= since - 1:
            shutil.rmtree(folder, ignore_errors=True)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_startup() -> None:
    """No start-up noise that is not about the run: Lightning's advertising tip, its own
    deprecation warnings, and its warning about `args` (the `vlm` command passes its argv on)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # fit guards the checkpoint folder itself (refused, --overwrite or --ckpt_path last)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # CaptionWriter keys predictions by sample key, not by Lightning's batch indices
    warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader")
    # a frozen vision tower stays in eval mode on purpose (VisionEncoder.train); the parameter table says so
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def _is_launcher_process() -> bool:
    """True in the process a user started (not in the ranks Lightning or torchrun start)."""
    return all(int(os.environ.get(name, "0")) == 0 for name in ("LOCAL_RANK", "RANK", "NODE_RANK"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli = VLMCLI(args=argv)
    return 130 if cli.subcommand == "fit" and cli.interrupted else 0
