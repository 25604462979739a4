r"""Context extension measured: passkey retrieval and perplexity at 256-2048 tokens of (a) the base model
trained at 256, (b) the base with a RoPE scaling and no fine-tuning, (c) the base after the extension
recipe (configs/long_context.yaml), for linear, YaRN and llama3 scaling.

    vlm data passkey --out data/passkey/base --train 40000 --val 256 --max-length 256
    vlm data passkey --out data/passkey/long --train 4000 --val 64 --min-length 256 --max-length 2048 \
        --tokenizer data/passkey/base/tokenizer.json
    python scripts/long_context_study.py

Every step runs `vlm fit` / `vlm export` / `vlm evaluate-context` in this process, and is skipped
when its output exists (a model directory, a context.json), so a rerun collects what is there and
does only what is missing. Writes OUT/results.json (every report, and a table) and OUT/<method>.png
(passkey accuracy and per-token loss against length, one line per model). `--fit-arg` /
`--base-arg` / `--extension-arg` pass extra `vlm fit` options (both runs / the base's / each
extension's), e.g. tiny settings for a test.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from vlm.cli import main as vlm

SCALINGS = {  # factor 8: from the 256 positions trained to 2048
    "linear": {"type": "linear", "factor": 8},
    "yarn": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 256},
    "llama3": {"type": "llama3", "factor": 8, "original_max_position_embeddings": 256},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/long_context"), help="runs and models")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/long_context"), help="results.json and PNGs")
    parser.add_argument("--base-config", default="configs/long_context/base.yaml")
    parser.add_argument("--config", default="configs/long_context.yaml", help="the extension recipe")
    parser.add_argument("--methods", nargs="+", choices=list(SCALINGS), default=list(SCALINGS))
    parser.add_argument("--original", type=int, default=256, help="the base's trained length")
    parser.add_argument("--factor", type=float, default=8.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--text", default="data/passkey/long/held_out.txt", help="held-out text for perplexity")
    parser.add_argument("--trials", type=int, default=4, help="passkey samples per depth and length")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows per length")
    for name, what in (("fit", "both fits"), ("base", "the base's fit"), ("extension", "each extension's fit")):
        parser.add_argument(f"--{name}-arg", action="append", default=[], help=f"extra `vlm fit` options for {what}")
    return parser.parse_args(argv)


def scaling(method: str, args: argparse.Namespace) -> dict:
    value = dict(SCALINGS[method], factor=args.factor)
    if "original_max_position_embeddings" in value:
        value["original_max_position_embeddings"] = args.original
    return value


def run(*argv: str) -> None:
    print("+ vlm", shlex.join(argv), flush=True)
    if vlm(list(argv)):
        raise SystemExit(f"vlm {shlex.join(argv)} failed")


def trained(root: Path, config: str, extra: list[str]) -> Path:
    """ROOT/model: `vlm fit` into ROOT, then `vlm export` of its last checkpoint (skipped when present)."""
    model = root / "model"
    if not (model / "config.json").is_file():
        run("fit", "--config", config, "--trainer.default_root_dir", str(root), *extra)
        run("export", "--checkpoint", str(root / "checkpoints" / "last.ckpt"), "--out", str(model), "--overwrite")
    return model


def evaluated(model: Path, out: Path, args: argparse.Namespace, rope: dict | None = None) -> dict:
    """`vlm evaluate-context` of `model` into OUT (skipped when OUT/context.json exists)."""
    report = out / "context.json"
    if not report.is_file():
        options = ["--rope-scaling", json.dumps(rope)] if rope else []
        run("evaluate-context", "--model", str(model), "--lengths", *map(str, args.lengths), "--text", args.text,
            "--trials", str(args.trials), "--windows", str(args.windows), "--out", str(out), *options)
    return json.loads(report.read_text())


def fit_args(args: argparse.Namespace, which: str) -> list[str]:
    return [a for line in args.fit_arg + getattr(args, f"{which}_arg") for a in shlex.split(line)]


def study(args: argparse.Namespace) -> dict:
    """Every run and evaluation; the reports by condition ("base", "<method>/scaled", "<method>/extended")."""
    base = trained(args.work / "base", args.base_config, fit_args(args, "base"))
    reports = {"base": evaluated(base, args.work / "base" / "context", args)}
    for method in args.methods:
        rope = scaling(method, args)
        reports[f"{method}/scaled"] = evaluated(base, args.work / "base" / f"context-{method}", args, rope)
        # null first: jsonargparse would merge the new method's keys into the recipe's YaRN
        extra = ["--model.init_checkpoint", str(base), "--model.config.text.rope_scaling", "null",
                 "--model.config.text.rope_scaling", json.dumps(rope), *fit_args(args, "extension")]
        model = trained(args.work / method, args.config, extra)
        reports[f"{method}/extended"] = evaluated(model, args.work / method / "context", args)
    return reports


def table(reports: dict, lengths: list[int]) -> list[dict]:
    """One row per condition: passkey accuracy and perplexity at each length."""
    return [{"model": name,
             "passkey": {str(n): report["passkey"][str(n)]["accuracy"] for n in lengths},
             "perplexity": {str(n): report["perplexity"][str(n)]["perplexity"] for n in lengths}}
            for name, report in reports.items()]


def plot(reports: dict, method: str, lengths: list[int], path: Path) -> None:
    from vlm.eval.plot import Series, line_chart

    names = {"base": "base (no scaling)", f"{method}/scaled": f"{method}, not fine-tuned",
             f"{method}/extended": f"{method}, extended"}
    keys = [str(n) for n in lengths]
    passkey = [Series(label, [reports[name]["passkey"][k]["accuracy"] for k in keys],
                      [reports[name]["passkey"][k]["stderr"] for k in keys]) for name, label in names.items()]
    loss = [Series(label, [reports[name]["perplexity"][k]["nll"] for k in keys], [0.0] * len(keys))
            for name, label in names.items()]
    chart = line_chart([(f"passkey accuracy ({method})", passkey), ("held-out loss (nats/token)", loss)],
                       lengths, x_label="context length (tokens)")
    chart.save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports = study(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = table(reports, args.lengths)
    results = {"lengths": args.lengths, "trained_length": args.original, "factor": args.factor,
               "scalings": {m: scaling(m, args) for m in args.methods}, "table": rows, "reports": reports}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for method in args.methods:
        plot(reports, method, args.lengths, args.out / f"{method}.png")
    for row in rows:
        cells = "  ".join(f"{n}: {100 * row['passkey'][str(n)]:5.1f}% {row['perplexity'][str(n)]:8.3f}"
                          for n in args.lengths)
        print(f"{row['model']:<18} {cells}")
    print(f"wrote {args.out / 'results.json'} and {', '.join(f'{m}.png' for m in args.methods)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
