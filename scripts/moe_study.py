"""Dense vs Mixture-of-Experts captioners on the shapes data, both fusions (MoE-LLaVA's question at CPU scale).

    python scripts/moe_study.py                        # train, export and evaluate the 4 runs, then collect
    python scripts/moe_study.py --from-runs            # only collect from the run folders already there

Four runs of the shapes recipe with the same steps and seed: {llava, flamingo} x {dense, moe}. The
MoE runs add configs/moe.yaml (4 SwiGLU experts, top-2, capacity 1.5, Switch aux loss 0.01) with
`expert_hidden_dim` = the recipe's `hidden_dim` / `top_k`, so a token runs through as many
feed-forward weights as in the dense model (plus the router). Each run is `vlm fit` into
`--out/<fusion>_<dense|moe>`, then `vlm export` and `vlm evaluate` on the held-out caption shards
(all in this process, each command printed as it runs). Training logs are the source of every number:

- time per step: the median over logging intervals of the TensorBoard events' wall-clock gaps of
  `train/loss` divided by the steps between them (validation and checkpoint intervals fall out);
- final train loss: the mean of the last `--tail` logged `train/loss` values (metrics.csv);
- expert load: `train/moe/<layer>/load/<expert>` (each expert's share of the token assignments),
  `imbalance` (largest share over the mean) and `dropped` (tokens over capacity), metrics.csv;
- held-out exact match, BLEU-4, CIDEr-D and the hallucination rate: `vlm evaluate`'s report.json;
- total and active parameters: the exported model through `vlm.training.memory.parameter_counts`
  (what `vlm memory` prints).

Writes `--bench-dir`/results.json, summary.png (exact match, time per step, train loss curves) and
expert_load_<fusion>.png (per MoE layer, each expert's share over training, the uniform 1/E dashed),
and prints the markdown table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("dense", "moe")
LOAD = re.compile(r"train/moe/(?P<layer>.+)/load/(?P<expert>\d+)$")


def run_vlm(command: list[str], log: list[dict]) -> None:
    """Run one `vlm` command in this process (printed first); SystemExit on a non-zero exit. Logs its
    wall seconds and this process's CPU seconds (all its threads; not the data loader's workers),
    which other jobs on a shared machine slow far less than wall time."""
    from vlm.cli import main as vlm

    print("$ " + shlex.join(["vlm", *command]), flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    if vlm(command):
        raise SystemExit(f"moe_study: `vlm {command[0]}` failed")
    log.append({"command": shlex.join(["vlm", *command]), "wall_seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(time.process_time() - cpu, 1)})


def recipe_configs(args: argparse.Namespace, fusion: str) -> list[Path]:
    return [ROOT / "configs" / "shapes.yaml", ROOT / "configs" / "fusion" / f"{fusion}.yaml", *args.extra_config]


def expert_hidden_dim(args: argparse.Namespace, fusion: str) -> int:
    """The recipe's dense `hidden_dim` / configs/moe.yaml's `top_k`: the dense model's active
    feed-forward parameters per token."""
    from vlm.training.memory import compose

    config = compose([*map(str, recipe_configs(args, fusion)), str(ROOT / "configs" / "moe.yaml")])
    text = config["model"]["config"]["text"]
    return text["hidden_dim"] // text["moe"]["top_k"]


def fit_command(args: argparse.Namespace, fusion: str, kind: str, out: Path) -> list[str]:
    configs = recipe_configs(args, fusion)
    moe = ["--config", str(ROOT / "configs" / "moe.yaml"),
           f"--model.config.text.moe.expert_hidden_dim={expert_hidden_dim(args, fusion)}"] if kind == "moe" else []
    data = [f"--data.train_shards={args.data}/caption/train-*.tar", f"--data.val_shards={args.data}/caption/val-*.tar",
            f"--data.tokenizer={args.data}/tokenizer.json", f"--data.shapes.out={args.data}"]
    return ["fit", *[a for c in configs for a in ("--config", str(c))], *moe, *data,
            f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.steps}",
            *([] if args.validate else ["--trainer.limit_val_batches=0"]),
            f"--seed_everything={args.seed}", f"--trainer.default_root_dir={out}"]


def train_and_evaluate(args: argparse.Namespace, fusion: str, kind: str) -> list[dict]:
    """fit, export and evaluate one run; returns its commands with their timings."""
    out, log = Path(args.out) / f"{fusion}_{kind}", []
    run_vlm(fit_command(args, fusion, kind, out), log)
    return log + evaluate(args, out)


def evaluate(args: argparse.Namespace, out: Path) -> list[dict]:
    """export and evaluate a trained run (its eval/ replaced); returns the commands with their timings."""
    log: list[dict] = []
    run_vlm(["export", "--checkpoint", str(out / "checkpoints" / "last.ckpt"), "--out", str(out / "model"),
             "--overwrite"], log)
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    run_vlm(["evaluate", "--model", str(out / "model"), "--data", f"{args.data}/caption/val-*.tar",
             "--out", str(out / "eval"), *limit], log)
    return log


def versions(run_dir: Path, folder: str) -> list[Path]:
    """A logger's version folders of a run, oldest first (a resumed run has several)."""
    found = sorted(run_dir.glob(f"{folder}/version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not found:
        raise SystemExit(f"moe_study: no {folder}/version_* in {run_dir} (was it trained with the shapes recipe's loggers?)")
    return found


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of a run from its CSV logs: name -> [(step, value)] in logging order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for version in versions(run_dir, "logs"):
        with open(version / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                for name, value in row.items():
                    if name not in ("step", "epoch") and value not in ("", None):
                        out.setdefault(name, []).append((int(row["step"]), float(value)))
    return out


def step_seconds(run_dir: Path, tag: str = "train/loss") -> dict:
    """Median and total wall seconds per training step from the TensorBoard events' wall times of `tag`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for version in versions(run_dir, "tb"):
        accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0})
        accumulator.Reload()
        events += [(e.step, e.wall_time) for e in accumulator.Scalars(tag)]
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(events, events[1:]) if s1 > s0]
    if not gaps:
        raise SystemExit(f"moe_study: fewer than two `{tag}` events in {run_dir}/tb: no step time")
    return {"median_s": statistics.median(gaps), "intervals": len(gaps),
            "logged_span_s": events[-1][1] - events[0][1], "logged_steps": events[-1][0] - events[0][0]}


def expert_loads(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """layer -> expert -> [(step, share of the layer's token assignments)]."""
    loads: dict[str, dict[int, list]] = {}
    for name, points in metrics.items():
        match = LOAD.match(name)
        if match:
            loads.setdefault(match["layer"], {})[int(match["expert"])] = points
    return {layer: dict(sorted(experts.items())) for layer, experts in sorted(loads.items())}


def tail_mean(points: list[tuple[int, float]], n: int) -> float:
    return statistics.fmean(v for _, v in points[-n:])


def moe_summary(metrics: dict[str, list[tuple[int, float]]], tail: int) -> dict:
    """Per MoE layer: each expert's share over the last `tail` logged steps, the imbalance and dropped share there."""
    out = {}
    for layer, experts in expert_loads(metrics).items():
        out[layer] = {"load": [round(tail_mean(points, tail), 4) for points in experts.values()],
                      "imbalance": round(tail_mean(metrics[f"train/moe/{layer}/imbalance"], tail), 4),
                      "dropped": round(tail_mean(metrics.get(f"train/moe/{layer}/dropped", [(0, 0.0)]), tail), 4)}
    return out


def parameters(model_dir: Path) -> dict:
    """Total and active-per-token parameters of the exported model and of its text backbone."""
    from vlm import load_model
    from vlm.training.memory import parameter_counts

    model = load_model(model_dir)
    (total, active), (text_total, text_active) = parameter_counts(model), parameter_counts(model.text)
    return {"total": total, "active": active, "text_total": text_total, "text_active": text_active}


def collect(run_dir: Path, tail: int) -> dict:
    """One run's numbers, all read from its logs, its evaluation report and its exported model."""
    metrics = read_metrics(run_dir)
    if "train/loss" not in metrics:
        raise SystemExit(f"moe_study: no train/loss in {run_dir}/logs")
    report_path = run_dir / "eval" / "report.json"
    if not report_path.is_file():
        raise SystemExit(f"moe_study: no {report_path}: run `vlm export` and `vlm evaluate --out {run_dir / 'eval'}`")
    report = json.loads(report_path.read_text())
    hallucination = report.get("hallucination", {})
    return {"steps": metrics["train/loss"][-1][0] + 1, "step_time": step_seconds(run_dir),
            "final_train_loss": round(tail_mean(metrics["train/loss"], tail), 4),
            "val_loss": metrics["val/loss"][-1][1] if "val/loss" in metrics else None,
            "eval": {"images": report["images"], **{k: report["metrics"][k] for k in ("exact_match", "bleu4", "cider_d")},
                     "hallucination_rate": hallucination.get("hallucination_rate")},
            "parameters": parameters(run_dir / "model"), "moe": moe_summary(metrics, tail),
            "curves": {"train/loss": metrics["train/loss"], "expert_load": expert_loads(metrics)}}


def plot_loads(runs: dict[str, dict], fusion: str, path: Path) -> None:
    """Each MoE layer's expert shares over training, one line per expert, the uniform share dashed."""
    import matplotlib.pyplot as plt

    loads = runs[f"{fusion}_moe"]["curves"]["expert_load"]
    fig, axes = plt.subplots(1, len(loads), figsize=(5.2 * len(loads), 3.6), squeeze=False)
    for ax, (layer, experts) in zip(axes[0], loads.items()):
        for expert, points in experts.items():
            ax.plot(*zip(*points), label=f"expert {expert}", lw=1.2)
        ax.axhline(1 / len(experts), color="k", ls="--", lw=1, label=f"uniform 1/{len(experts)}")
        ax.set(title=f"{fusion} MoE, {layer}", xlabel="step", ylabel="share of token assignments", ylim=(0, None))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(runs: dict[str, dict], path: Path) -> None:
    """Held-out exact match, median wall and fit CPU seconds per step per run, and the train loss curves."""
    import matplotlib.pyplot as plt

    names = list(runs)
    colours = ["tab:blue" if name.endswith("dense") else "tab:orange" for name in names]
    panels = [([100 * runs[n]["eval"]["exact_match"] for n in names], "held-out exact match (%)", "{:.1f}"),
              ([runs[n]["step_time"]["median_s"] for n in names], "median wall time per step (s)", "{:.3f}")]
    if all("fit_cpu_s_per_step" in runs[n] for n in names):
        panels.append(([runs[n]["fit_cpu_s_per_step"] for n in names], "fit CPU time per step (s)", "{:.3f}"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.2 * (len(panels) + 1), 3.8))
    for ax, (values, title, fmt) in zip(axes, panels):
        bars = ax.bar(names, values, color=colours)
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=7)
    for name in names:
        axes[-1].plot(*zip(*runs[name]["curves"]["train/loss"]), lw=1, alpha=0.8, label=name,
                      ls="-" if name.endswith("dense") else "--")
    axes[-1].set(title="train loss (logged steps)", xlabel="step", yscale="log")
    axes[-1].legend(fontsize=8)
    axes[-1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: dict[str, dict]) -> str:
    lines = ["| fusion | feed-forward | steps | parameters total / active | exact match | CIDEr-D | "
             "hallucinated | final train loss | median s/step | fit CPU s/step | load per layer (expert shares, last logs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        fusion, kind = name.rsplit("_", 1)
        p, e = r["parameters"], r["eval"]
        loads = "; ".join(f"{layer}: " + " / ".join(f"{v:.2f}" for v in m["load"]) for layer, m in r["moe"].items())
        halluc = "-" if e["hallucination_rate"] is None else f"{100 * e['hallucination_rate']:.1f}%"
        lines.append(f"| {fusion} | {kind} | {r['steps']} | {p['total']:,} / {p['active']:,} | "
                     f"{100 * e['exact_match']:.1f}% | {e['cider_d']:.2f} | {halluc} | {r['final_train_loss']:.3f} | "
                     f"{r['step_time']['median_s']:.3f} | {r.get('fit_cpu_s_per_step', '-')} | {loads or '-'} |")
    return "\n".join(lines)


def write(runs: dict[str, dict], settings: dict, bench_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    bench_dir.mkdir(parents=True, exist_ok=True)
    (bench_dir / "results.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    plot_summary(runs, bench_dir / "summary.png")
    for fusion in dict.fromkeys(name.rsplit("_", 1)[0] for name in runs):
        if f"{fusion}_moe" in runs:
            plot_loads(runs, fusion, bench_dir / f"expert_load_{fusion}.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fusions", nargs="+", default=["llava", "flamingo"], choices=["llava", "flamingo"])
    p.add_argument("--steps", type=int, default=1000, help="training steps of every run (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed_everything of every run (default %(default)s)")
    p.add_argument("--validate", action="store_true", help="validate (loss, 128 captions) at the last step; "
                   "off by default: the held-out evaluation is the measure and generation is slow on a busy CPU")
    p.add_argument("--evaluate-only", action="store_true", help="train nothing: export and evaluate the runs "
                   "in --out again (e.g. with another --eval-limit), then collect")
    p.add_argument("--from-runs", action="store_true", help="train nothing: collect from the run folders in --out")
    p.add_argument("--data", default="data/shapes", help="the shapes folder (made by the first run when missing)")
    p.add_argument("--out", default="outputs/moe_study", help="run folders: OUT/<fusion>_<dense|moe>")
    p.add_argument("--bench-dir", type=Path, default=ROOT / "benchmarks" / "moe_study", help="results.json and PNGs")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many images (default: all)")
    p.add_argument("--tail", type=int, default=10, help="logged points averaged for final loss and load (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument("--extra-config", action="append", default=[], type=Path, metavar="YAML",
                   help="a config added to every `vlm fit` after the recipe's (e.g. a smaller model)")
    return p


def earlier_commands(bench_dir: Path) -> dict[str, list[dict]]:
    """The commands (with their timings) an earlier full study wrote to results.json, by run."""
    path = bench_dir / "results.json"
    if not path.is_file():
        return {}
    return {name: run["commands"] for name, run in json.loads(path.read_text())["runs"].items()
            if run["commands"] and isinstance(run["commands"][0], dict)}


def study_run(args: argparse.Namespace, fusion: str, kind: str, commands: list[dict] | None) -> dict:
    """One run's results; with the commands that made it (from this process or an earlier study),
    the CPU seconds per step of its `vlm fit` (startup, validation and checkpoints included)."""
    run_dir = Path(args.out) / f"{fusion}_{kind}"
    run = collect(run_dir, args.tail)
    if not commands or not commands[0]["command"].startswith("vlm fit "):
        return {"commands": commands or [shlex.join(["vlm", *fit_command(args, fusion, kind, run_dir)])], **run}
    return {"commands": commands, "fit_cpu_s_per_step": round(commands[0]["cpu_seconds"] / run["steps"], 4), **run}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    names = [f"{fusion}_{kind}" for fusion in args.fusions for kind in KINDS]
    if args.from_runs:
        commands = earlier_commands(args.bench_dir)
    elif args.evaluate_only:  # the fit commands (and timings) of the study that trained the runs are kept
        earlier = earlier_commands(args.bench_dir)
        commands = {name: [c for c in earlier.get(name, []) if c["command"].startswith("vlm fit ")]
                    + evaluate(args, Path(args.out) / name) for name in names}
    else:
        commands = {name: train_and_evaluate(args, *name.rsplit("_", 1)) for name in names}
    runs = {name: study_run(args, *name.rsplit("_", 1), commands.get(name)) for name in names}
    settings = {k: [str(p) for p in v] if k == "extra_config" else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()}
    write(runs, settings, args.bench_dir)
    print(table(runs))
    print(f"results: {args.bench_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
