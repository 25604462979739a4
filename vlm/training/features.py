"""`vlm features build --config RECIPE [--config ...] --data 'SHARDS' --out DIR`: cache a recipe's
frozen vision tower outputs (see `vlm.features`), then train with `--data.features DIR`.

The recipe gives the tower (model.config.vision, with model.init_checkpoint when set), its stage
(a tower that trains is refused) and the precision its outputs are stored in (trainer.precision).
A frozen tower is meant to hold pretrained weights (vision.checkpoint_path, vision.pretrained or
model.init_checkpoint): random weights are drawn anew by each run and never match a cache.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

from vlm.data.pipeline import expand_shards
from vlm.errors import UserError
from vlm.features import build_features, precision_dtype
from vlm.model import VLMConfig, build_model
from vlm.stages import set_trainable


def recipe_tower(config_files: Sequence[str], cli_args: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    """The recipe's model with the weights its tower trains from, its stage applied, in the
    recipe's precision (a `-true` precision converts the weights, as Lightning does), and that precision."""
    from vlm.training.memory import compose
    from vlm.training.module import initial_state

    recipe = compose(config_files, cli_args)
    spec = recipe["model"]
    model = build_model(VLMConfig.from_dict(dict(spec["config"])))
    if spec.get("init_checkpoint"):
        model.load_state_dict(initial_state(spec["init_checkpoint"], model.state_dict()), strict=True)
    set_trainable(model, spec.get("stage"), include=spec.get("include") or (), exclude=spec.get("exclude") or ())
    precision = recipe["trainer"].get("precision")
    if str(precision).endswith("-true"):
        model.vision.to(precision_dtype(precision))
    return model, precision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm features", description="Cache a recipe's frozen vision tower outputs over shards. Other arguments "
        "(--trainer.* / --model.* / --data.*) override the recipe as for vlm fit.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="run the tower once over shards and store its outputs",
                                description="Run the recipe's frozen vision tower over SHARDS and store its outputs in "
                                "OUT, keyed by sample key; train with --data.features OUT. Resumable: finished "
                                "shards are kept.")
    build.add_argument("--config", action="append", required=True, help="a recipe YAML; repeat to compose, as for vlm fit")
    build.add_argument("--data", action="append", required=True,
                       help="shards (paths, globs or brace patterns); repeat for several, e.g. train and val")
    build.add_argument("--out", required=True, help="the cache directory")
    build.add_argument("--batch-size", type=int, default=64, help="images per tower forward (default 64)")
    build.add_argument("--device", default="cpu", help="where the tower runs (default cpu)")
    build.add_argument("--overwrite", action="store_true", help="empty a cache made by another tower or precision")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args, cli_args = parser.parse_known_args(argv)
    shards = expand_shards(args.data)
    if not shards:
        raise UserError(f"--data {args.data}: no shard matches")
    model, precision = recipe_tower(args.config, cli_args)
    model.vision.to(args.device)
    start = time.perf_counter()
    report = build_features(model, shards, args.out, precision=precision, batch_size=args.batch_size,
                            overwrite=args.overwrite, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(f"{report.summary()} in {seconds:.1f} s -> {args.out}")
    for reason, message in sorted(report.first_errors.items()):
        print(f"  first {reason}: {message}")
    return 0
