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

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fusion", choices=["llava", "flamingo"], default="llava")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--eval-limit", type=int, default=None, help="score at most this many held-out images")
    args, overrides = parser.parse_known_args(argv)  # the rest goes to `vlm fit`, e.g. --trainer.max_steps=100
    os.chdir(ROOT)  # the recipe's data paths are relative to the repository
    out = args.out / args.fusion
    times: dict[str, float] = {}

    from vlm.cli import main as vlm
    from vlm.training.recipes import export, fit, recipe_files

    start = time.perf_counter()
    configs = recipe_files("shapes", f"fusion/{args.fusion}")
    print("$ vlm fit " + " ".join(f"--config {c.relative_to(ROOT)}" for c in configs) + " --overwrite " + " ".join(overrides), flush=True)
    fit(configs, out, overrides=overrides, overwrite=True)  # the demo always trains afresh
    times["data + training"] = time.perf_counter() - start

    start = time.perf_counter()
    model_dir = export(out / "checkpoints" / "last.ckpt", out / "model")
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
