"""Run a shipped recipe from Python (scripts and notebooks): `vlm fit` with every output under one
folder, then `vlm export`. The same code path as the command line."""

from __future__ import annotations

from pathlib import Path

from vlm.training.cli import VLMCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def recipe_files(*names: str) -> list[Path]:
    """`recipe_files("shapes", "fusion/llava")` -> the YAML paths in configs/."""
    paths = [CONFIGS / f"{name.removesuffix('.yaml')}.yaml" for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no recipe {missing}; see {CONFIGS}")
    return paths


def fit(configs: list[str | Path], out: str | Path, *, overrides: list[str] = (), overwrite: bool = False) -> VLMCLI:
    """`vlm fit --config ...` with `trainer.default_root_dir` set to `out`: the shipped recipes put
    their logs, checkpoints and caption grids under it.

    `overrides` are command-line flags, e.g. ["--trainer.max_steps=200"]; `overwrite` deletes an
    earlier run's checkpoints in `out` first (`--overwrite`; without it such a folder is refused).
    Returns the CLI object (`.trainer`, `.model`, `.datamodule`); the last checkpoint is
    `out/checkpoints/last.ckpt`.
    """
    out = Path(out)
    args = ["fit", *[a for f in configs for a in ("--config", str(f))], f"--trainer.default_root_dir={out}",
            *(["--overwrite"] if overwrite else []), *overrides]
    return VLMCLI(args=args)


def export(checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """`vlm export`: a checkpoint -> a model directory `vlm.load_model` reads. Returns `out`."""
    from vlm.training.export import main

    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]
    if tokenizer is not None:
        args += ["--tokenizer", str(tokenizer)]
    if main(args) != 0:
        raise RuntimeError(f"export of {checkpoint} failed (see the message above)")
    return Path(out)
