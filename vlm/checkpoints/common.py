"""What the Hugging Face and Meta layouts share: required-key checks, JSON reading, and loading a
state dict that must match its model exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from vlm.errors import UserError


def _require(config: object, keys: tuple[str, ...], source: str, *, where: str = "") -> None:
    """UserError naming the file and every missing key (`where`: the nested object they belong in)."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a JSON object{where}, got {type(config).__name__}")
    missing = [key for key in keys if config.get(key) is None]
    if missing:
        raise UserError(f"{source}: missing required key(s) {', '.join(missing)}{where} (required: {', '.join(keys)}): "
                        "add them, or use the file that came with the checkpoint")


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file} is not valid JSON ({error}): restore the checkpoint's own file") from None


def load_state_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict(assign=True), but every missing, unexpected or mis-shaped tensor is named."""
    expected = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied:
        expected.pop("output.weight", None)
        state = {k: v for k, v in state.items() if k != "output.weight"}
    problems = [f"missing tensor {k} (expected shape {tuple(v.shape)})" for k, v in expected.items() if k not in state]
    problems += [f"unexpected tensor {k} (shape {tuple(v.shape)})" for k, v in state.items() if k not in expected]
    problems += [
        f"tensor {k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ValueError(f"{source}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight


def check_replaceable(path: Path, *, overwrite: bool, ours: Callable[[Path], bool], what: str) -> bool:
    """Whether an existing directory at `path` is to be replaced by a writer; raises FileExistsError
    if it may not be: a file, a non-empty directory without `overwrite`, or one that `ours` does not
    recognise (`what` names the kind it is not), which is never replaced."""
    if not path.exists():
        return False
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not any(path.iterdir()):
        return True
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass --overwrite (overwrite=True in Python) "
                              "to replace it")
    if not ours(path):
        raise FileExistsError(f"{path} is not {what}; refusing to replace it even with --overwrite (overwrite=True)")
    return True
