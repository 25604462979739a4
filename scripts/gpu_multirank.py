"""The multi-rank paths on the accelerators at hand, for `scripts/gpu_check.sh`: for FSDP2
(`configs/strategy/fsdp2.yaml`) and FSDP1 (`configs/strategy/fsdp.yaml`, CUDA only), train the
shapes recipe with validation and sharded checkpoints, train it again but SIGKILL it after a
checkpoint, resume with `--ckpt_path last`, compare the resumed losses with the uninterrupted
run's, and export the sharded checkpoint.

Ranks: 2 when two GPUs are visible; with one GPU each strategy runs on one rank (NCCL refuses two
ranks on one device), which still writes and resumes sharded checkpoints; `--accelerator cpu`
runs FSDP2 on 2 gloo processes (FSDP1 needs CUDA). Writes `summary.json` to --out; exits 1 when a
check fails.

    python scripts/gpu_multirank.py --out outputs/gpu_check/multirank [--accelerator cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from training_helpers import read_losses  # noqa: E402

STRATEGIES = {"fsdp2": "configs/strategy/fsdp2.yaml", "fsdp1": "configs/strategy/fsdp.yaml"}


def overrides(out: Path, shapes: Path, *, accelerator: str, devices: int, steps: int, every: int, kill_at: int | None,
              compile_blocks: bool = False) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "checkpoints"), "every_n_train_steps": every, "save_last": True, "save_top_k": -1}},
        {"class_path": "vlm.training.CaptionGrid"},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "training_helpers.KillAtStep", "init_args": {"step": kill_at}})
    recipe = {
        "trainer": {"accelerator": accelerator, "devices": devices, "max_steps": steps, "val_check_interval": every,
                    "limit_val_batches": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "default_root_dir": str(out), "callbacks": callbacks,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}}]},
        "model": {"caption_samples": 16, "max_new_tokens": 16, "compile": compile_blocks},
        "data": {"train_shards": str(shapes / "caption" / "train-*.tar"), "val_shards": str(shapes / "caption" / "val-*.tar"),
                 "tokenizer": str(shapes / "tokenizer.json"), "shapes": None, "num_workers": 2},
    }
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def vlm(args: list[str], *, timeout: float) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "vlm.cli", *args], cwd=ROOT, env=env, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"!! vlm {args[0]} hung for {timeout:.0f} s", flush=True)
        return 124
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # ranks left behind by a killed launcher
        except ProcessLookupError:
            pass


def check(name: str, strategy: str, args: argparse.Namespace, shapes: Path) -> dict:
    base = ["fit", "--config", "configs/shapes.yaml", "--config", "configs/fusion/llava.yaml", "--config", strategy]
    runs = {}
    compiled = args.compile and name == "fsdp2"  # model.compile: per-block torch.compile under FSDP2
    for run, kill in (("straight", None), ("killed", args.steps - args.every // 2)):
        out = args.out / name / run
        recipe = overrides(out, shapes, accelerator=args.accelerator, devices=args.devices, steps=args.steps, every=args.every, kill_at=kill,
                           compile_blocks=compiled)
        start = time.perf_counter()
        runs[run] = {"exit": vlm([*base, "--config", str(recipe), "--overwrite"], timeout=args.timeout)}
        if kill is not None:
            recipe = overrides(out, shapes, accelerator=args.accelerator, devices=args.devices, steps=args.steps, every=args.every, kill_at=None,
                               compile_blocks=compiled)
            runs["resumed"] = {"exit": vlm([*base, "--config", str(recipe), "--ckpt_path", "last"], timeout=args.timeout)}
        runs[run]["seconds"] = round(time.perf_counter() - start, 1)
    straight, resumed = read_losses(args.out / name / "straight"), read_losses(args.out / name / "killed")
    after = range(args.steps - args.every, args.steps)  # the steps redone from the last checkpoint
    last = args.out / name / "killed" / "checkpoints" / "last.ckpt"
    exported = vlm(["export", "--checkpoint", str(last), "--out", str(args.out / name / "model"), "--overwrite"], timeout=300)
    result = {
        "runs": runs, "compiled": compiled, "sharded_checkpoint": last.is_dir(), "export_exit": exported,
        "resume_exact": bool(straight) and all(resumed.get(s) == straight.get(s) is not None for s in after),
        "losses": {"straight": [straight.get(s) for s in after], "resumed": [resumed.get(s) for s in after]},
    }
    result["ok"] = (runs["straight"]["exit"] == 0 and runs["killed"]["exit"] == -signal.SIGKILL
                    and runs["resumed"]["exit"] == 0 and exported == 0 and result["resume_exact"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check" / "multirank")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=20, help="validation and checkpoint interval")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run before it counts as hung")
    parser.add_argument("--devices", type=int, default=None, help="ranks (default: 2 GPUs if visible, else 1; 2 on CPU)")
    parser.add_argument("--compile", action="store_true", help="the FSDP2 runs with model.compile true")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.accelerator == "gpu":
        import torch

        args.devices = args.devices or min(torch.cuda.device_count(), 2)
        strategies = STRATEGIES
    else:
        args.devices, strategies = args.devices or 2, {"fsdp2": STRATEGIES["fsdp2"]}
    shapes = args.out / "shapes"
    if not (shapes / "tokenizer.json").exists():
        from vlm.data.corpus import write_corpus
        from vlm.data.shapes import make_shapes_dataset
        from vlm.text.tokenizer import Tokenizer

        make_shapes_dataset(shapes, train=2000, val=64, seed=0, variants=["caption"], overwrite=True)
        write_corpus(sorted((shapes / "caption").glob("train-*.tar")), shapes / "corpus.txt")
        Tokenizer.train([shapes / "corpus.txt"], 512, show_progress=False).save(shapes / "tokenizer.json")
    summary = {"accelerator": args.accelerator, "devices": args.devices}
    for name, strategy in strategies.items():
        summary[name] = check(name, strategy, args, shapes)
        print(f"== {name} on {args.devices} {args.accelerator} rank(s): {json.dumps(summary[name])}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if all(summary[name]["ok"] for name in strategies) else 1


if __name__ == "__main__":
    sys.exit(main())
