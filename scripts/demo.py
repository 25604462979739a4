"""The main job, end to end on the built-in data: `make demo` (LLaVA) or `make demo FUSION=flamingo`.

1. generate the synthetic shapes set and its tokenizer (data/shapes/, once),
2. train a small model from scratch on CPU: `vlm fit --config configs/shapes.yaml --config configs/fusion/F.yaml`,
3. export it (`vlm export`), 4. caption the held-out images and score them (`vlm evaluate`).

Prints the held-out exact match, where the caption grid is, and the time of each phase.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(fusion: str, out: Path, extra: list[str]) -> Path:
    """Train with the shipped recipe, writing under `out`; returns the final checkpoint."""
    from vlm.training.cli import VLMCLI

    override = {
        "trainer": {
            "default_root_dir": str(out),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}},
                       {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(out), "name": "tb"}}],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True, "save_top_k": 0}},
                {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
                {"class_path": "vlm.training.CaptionGrid"},
            ],
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.yaml").write_text(yaml.safe_dump(override))
    configs = [ROOT / "configs" / "shapes.yaml", ROOT / "configs" / "fusion" / f"{fusion}.yaml", out / "demo.yaml"]
    args = ["fit", *[a for c in configs for a in ("--config", str(c))], *extra]
    print("$ vlm " + " ".join(args), flush=True)
    VLMCLI(args=args)
    return out / "checkpoints" / "last.ckpt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fusion", choices=["llava", "flamingo"], default="llava")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--eval-limit", type=int, default=None, help="score at most this many held-out images")
    args, overrides = parser.parse_known_args(argv)  # the rest goes to `vlm fit`, e.g. --trainer.max_steps=100
    os.chdir(ROOT)  # the recipe's data paths are relative to the repository
    out = args.out / args.fusion
    times: dict[str, float] = {}

    start = time.perf_counter()
    checkpoint = run_recipe(args.fusion, out, overrides)
    times["data + training"] = time.perf_counter() - start

    from vlm.cli import main as vlm

    start = time.perf_counter()
    model_dir = out / "model"
    if vlm(["export", "--checkpoint", str(checkpoint), "--out", str(model_dir), "--overwrite"]) != 0:
        return 1
    times["export"] = time.perf_counter() - start

    start = time.perf_counter()
    evaluate = ["evaluate", "--model", str(model_dir), "--data", "data/shapes/caption/val-*.tar", "--out", str(out / "eval")]
    if args.eval_limit:
        evaluate += ["--limit", str(args.eval_limit)]
    if vlm(evaluate) != 0:
        return 1
    times["evaluation"] = time.perf_counter() - start

    import json

    report = json.loads((out / "eval" / "report.json").read_text())
    total = sum(times.values())
    print(f"\n== demo ({args.fusion}) ==")
    print(f"held-out exact match: {report['metrics']['exact_match']:.1%} on {report['images']} images "
          f"(BLEU-4 {report['metrics']['bleu4']:.3f}, CIDEr-D {report['metrics']['cider_d']:.3f})")
    print(f"caption grid: {out / 'eval' / 'captions.png'}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f", total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
