"""DPO vs continued supervised training on the shapes data: does preference tuning cut hallucination?

    python scripts/preference_bench.py                      # both fusions, the defaults below
    python scripts/preference_bench.py --fusions llava --sft-steps 1000 --dpo-steps 300

For each fusion, with the shipped recipes and nothing but `vlm` commands (each printed as it runs,
all in this process):
1. `vlm fit` the shapes recipe for only `--sft-steps` steps (a captioner that still hallucinates),
2. DPO from it (configs/stage/dpo.yaml, with the tower training and lr 5e-4: `--dpo-flag`) for
   `--dpo-steps` steps on the shapes preference pairs (the true caption chosen, the same caption
   with one attribute wrong rejected); once plain, once with the chosen answers' token loss added
   (`model.preference.sft_weight 1`, RPO),
3. from the same start, supervised training on the chosen answers of the same pairs for as long as
   the slower DPO run trained (steps = its training seconds / the first run's seconds per step),
   with the recipe's own optimizer settings (lr 2e-3, cosine),
4. `vlm export` + `vlm evaluate` each of the four on the held-out caption images: exact match and
   the hallucination rate (captions contradicting their image, vlm.eval.hallucination).

Times are training loops only (Lightning's Timer: not data generation, tokenizer training or
evaluation).

Writes `--results` (JSON: every command, wall times, metrics, DPO's curves; the other fusions
already in that file are kept, so fusions can run in separate processes) and a plot of DPO's loss
and rewards next to it, and prints the table of benchmarks/README.md "preference tuning".
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# The DPO runs from the partway captioner: plain DPO, and DPO plus the chosen answers' token loss.
DPO_RUNS = {"dpo": [], "dpo_sft": ["--model.preference.sft_weight=1.0"]}
RUNS = {"sft": "SFT, partway", "dpo": "+ DPO", "dpo_sft": "+ DPO + SFT term (sft_weight 1)",
        "more_sft": "+ SFT on the chosen answers"}
# DPO's settings here (on top of configs/stage/dpo.yaml): the tower trains, as in the shapes
# recipe (trained from scratch, it is where most errors are), at a higher learning rate.
DPO_DEFAULT_FLAGS = ["--model.stage=full", "--model.optim.lr=5e-4"]


def run(command: list[str], log: list[dict]) -> float:
    """Run one `vlm` command in this process (printed first); raise on a non-zero exit. Returns
    the wall seconds of the command, or of a fit its training loop alone (Lightning's Timer: no
    data generation or tokenizer training, which the first run does)."""
    from lightning.pytorch.callbacks import Timer

    from vlm.cli import main as vlm
    from vlm.training.cli import VLMCLI

    print("$ " + shlex.join(["vlm", *command]), flush=True)
    start = time.perf_counter()
    if command[0] == "fit":
        timer = json.dumps({"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"interval": "step"}})
        cli = VLMCLI(args=[*command, f"--trainer.callbacks+={timer}"])
        seconds = next(c for c in cli.trainer.callbacks if isinstance(c, Timer)).time_elapsed("train")
    else:
        if vlm(command):
            raise SystemExit(f"preference_bench: `vlm {command[0]}` failed")
        seconds = time.perf_counter() - start
    log.append({"command": shlex.join(["vlm", *command]), "seconds": round(seconds, 1),
                "wall_seconds": round(time.perf_counter() - start, 1)})
    return seconds


def fit_command(args: argparse.Namespace, fusion: str, out: Path, *more: str) -> list[str]:
    configs = [ROOT / "configs" / "shapes.yaml", ROOT / "configs" / "fusion" / f"{fusion}.yaml"]
    extra = [ROOT / "configs" / "stage" / "dpo.yaml"] if "dpo" in more else []
    flags = [a for c in [*configs, *extra, *args.extra_config] for a in ("--config", str(c))]
    data = [f"--data.train_shards={args.data}/caption/train-*.tar", f"--data.val_shards={args.data}/caption/val-*.tar",
            f"--data.tokenizer={args.data}/tokenizer.json", f"--data.shapes.out={args.data}"]
    return ["fit", *flags, *data, f"--trainer.default_root_dir={out}", "--overwrite",
            *[m for m in more if m != "dpo"]]


def pairs(args: argparse.Namespace) -> list[str]:
    """The preference pairs as training and validation data."""
    return [f"--data.train_shards={args.data}/preference/train-*.tar",
            f"--data.val_shards={args.data}/preference/val-*.tar", "--data.shapes.variants=[preference]"]


def evaluate(args: argparse.Namespace, run_dir: Path, log: list[dict]) -> dict:
    model = run_dir / "model"
    run(["export", "--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(model)], log)
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    run(["evaluate", "--model", str(model), "--data", f"{args.data}/caption/val-*.tar", "--out",
         str(run_dir / "eval"), *limit], log)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    return {"exact_match": report["metrics"]["exact_match"], "cider_d": report["metrics"]["cider_d"],
            **{k: v for k, v in report["hallucination"].items() if k != "num_images"}, "images": report["images"]}


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """DPO's logged train/val loss, reward accuracy and margin: name -> [(step, value)]."""
    names = [f"{split}/{name}" for split in ("train", "val")
             for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")] + ["val/exact_match"]
    out: dict[str, list] = {name: [] for name in names}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            for name in names:
                if row.get(name):
                    out[name].append((int(row["step"]), float(row[name])))
    return out


def bench_fusion(args: argparse.Namespace, fusion: str) -> dict:
    out = Path(args.out) / fusion
    log: list[dict] = []
    # the first run makes the caption and preference shards (and the tokenizer) when they are missing
    sft_s = run(fit_command(args, fusion, out / "sft", "--data.shapes.variants=[caption,preference]",
                            f"--trainer.max_steps={args.sft_steps}"), log)
    start = str(out / "sft" / "checkpoints" / "last.ckpt")
    every = f"--trainer.val_check_interval={args.val_every}"
    seconds, steps = {"sft": sft_s}, {"sft": args.sft_steps}
    for name, flags in DPO_RUNS.items():
        seconds[name] = run(fit_command(args, fusion, out / name, "dpo", *pairs(args), f"--model.init_checkpoint={start}",
                                        f"--trainer.max_steps={args.dpo_steps}", every, *args.dpo_flag, *flags), log)
        steps[name] = args.dpo_steps
    # as long as the slower DPO run took, at the first run's seconds per step
    steps["more_sft"] = max(1, round(max(seconds["dpo"], seconds["dpo_sft"]) / (sft_s / args.sft_steps)))
    seconds["more_sft"] = run(fit_command(args, fusion, out / "more_sft", *pairs(args), f"--model.init_checkpoint={start}",
                                          f"--trainer.max_steps={steps['more_sft']}", every, *args.sft_flag), log)
    results = {name: evaluate(args, out / name, log) for name in RUNS}
    return {"steps": steps, "seconds": {k: round(v, 1) for k, v in seconds.items()}, "metrics": results,
            "dpo_curves": {name: curves(out / name) for name in DPO_RUNS}, "commands": log}


def table(report: dict) -> str:
    lines = ["| fusion | model | steps | wall s | exact match | hallucinated | malformed | colour / kind / size / count / order wrong |",
             "|---|---|---|---|---|---|---|---|"]
    for fusion, run_ in report["fusions"].items():
        for key, name in RUNS.items():
            m = run_["metrics"][key]
            wrong = " / ".join(f"{100 * v:.1f}" for v in m["by_attribute"].values())
            lines.append(f"| {fusion} | {name} | {run_['steps'][key]} | {run_['seconds'][key]:.0f} | "
                         f"{100 * m['exact_match']:.1f}% | {100 * m['hallucination_rate']:.1f}% | "
                         f"{100 * m['malformed_rate']:.1f}% | {wrong} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("loss", "loss (dpo_sft: + the SFT term)"), ("rewards/accuracies", "reward accuracy"),
             ("rewards/margins", "reward margin"), ("logps/chosen", "log-prob of the chosen answer")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, (name, title) in zip(axes, names):
        for fusion, run_ in report["fusions"].items():
            for dpo, curves_ in run_["dpo_curves"].items():
                for split, style in (("train", "-"), ("val", "o--")):
                    points = curves_[f"{split}/{name}"]
                    if points:
                        ax.plot(*zip(*points), style, label=f"{fusion} {dpo} {split}", alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("DPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fusions", nargs="+", default=["llava", "flamingo"], choices=["llava", "flamingo"])
    p.add_argument("--sft-steps", type=int, default=1000, help="the partway captioner's steps (default %(default)s)")
    p.add_argument("--dpo-steps", type=int, default=300, help="default %(default)s")
    p.add_argument("--val-every", type=int, default=100, help="validation interval of DPO and continued SFT")
    p.add_argument("--dpo-flag", action="append", default=None, metavar="FLAG",
                   help="a `vlm fit` flag for the DPO runs, e.g. --dpo-flag=--model.preference.beta=0.5 (default: "
                        f"{' '.join(DPO_DEFAULT_FLAGS)})")
    p.add_argument("--sft-flag", action="append", default=[], metavar="FLAG",
                   help="an extra `vlm fit` flag for the continued SFT run (default: the recipe's own optimizer)")
    p.add_argument("--data", default="data/shapes", help="the shapes folder; its caption and preference variants "
                   "are made by the first run when missing (default %(default)s)")
    p.add_argument("--out", default="outputs/preference_bench")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many images (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    p.add_argument("--extra-config", action="append", default=[], type=Path, metavar="YAML",
                   help="a config added to every `vlm fit` after the recipe's (e.g. a smaller model)")
    p.add_argument("--results", type=Path, default=RESULTS / "preference.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.dpo_flag = DPO_DEFAULT_FLAGS if args.dpo_flag is None else args.dpo_flag
    import torch

    torch.set_num_threads(args.threads)
    settings = {k: ([str(p) for p in v] if k == "extra_config" else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()}
    fusions = {fusion: {"settings": settings, **bench_fusion(args, fusion)} for fusion in args.fusions}
    # other fusions already in the results file are kept (e.g. from a run of --fusions flamingo)
    earlier = json.loads(args.results.read_text())["fusions"] if args.results.is_file() else {}
    report = {"fusions": {**{k: v for k, v in earlier.items() if k not in fusions}, **fusions}}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.results.with_suffix(".png"))
    print(table(report))
    print(f"results: {args.results}\ncurves:  {args.results.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
