"""The `vlm` command: a thin dispatcher to the subcommands, each importing only what it needs.

`vlm tokenizer ...` never imports Lightning; `vlm fit ...` does. Each entry maps a subcommand to
`module:function`, where the function takes the remaining argv.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

from vlm.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("vlm.text.tokenizer:main", "train a byte-level BPE tokenizer"),
    "data": ("vlm.data.cli:main", "make shards: synthetic shapes, COCO, LLaVA, image folders"),
    "fit": ("vlm.training.cli:main", "train a model from YAML recipes (LightningCLI)"),
    "validate": ("vlm.training.cli:main", "validate a model from YAML recipes"),
    "test": ("vlm.training.cli:main", "test a model from YAML recipes"),
    "predict": ("vlm.training.cli:main", "predict with a model from YAML recipes"),
    "export": ("vlm.training.export:main", "export a Lightning checkpoint to a vlm model directory"),
    "caption": ("vlm.caption:main", "caption images with an exported model"),
    "evaluate": ("vlm.eval.evaluate:main", "evaluate captioning on shards: JSON report and PNG grid"),
    "evaluate-context": ("vlm.eval.context:main", "passkey retrieval and perplexity against context length"),
    "memory": ("vlm.training.memory:main", "estimate per-device memory of a recipe"),
    "features": ("vlm.training.features:main", "cache a recipe's frozen vision tower outputs over shards"),
    "index": ("vlm.retrieval.cli:main", "build a retrieval index over caption shards; query it with images"),
}

# Subcommands handed to LightningCLI keep their own name as the first argument.
_KEEP_NAME = {"fit", "validate", "test", "predict"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlm <command> [args...] [--debug]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


_PACKAGE = str(Path(__file__).resolve().parent)


def is_user_error(error: BaseException) -> bool:
    """Errors a user fixes: UserError and missing/existing files anywhere, Lightning's
    MisconfigurationException (contradictory trainer settings), and the ValueError,
    KeyError or TypeError that vlm's own checks raise (validation of configs and inputs); the same
    types raised inside torch, Lightning or another library are bugs and keep their traceback."""
    if isinstance(error, (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return True
    if type(error).__name__ == "MisconfigurationException":  # Lightning: trainer settings that contradict each other
        return True
    if not isinstance(error, (ValueError, KeyError, TypeError)) or error.__traceback__ is None:
        return False
    return traceback.extract_tb(error.__traceback__)[-1].filename.startswith(_PACKAGE)


def one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # full tracebacks for every error
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        result = func([name, *rest] if name in _KEEP_NAME else rest)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        print(f"vlm {name}: {one_line(error)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
