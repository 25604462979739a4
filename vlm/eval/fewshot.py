"""Few-shot captioning evaluation, the OpenFlamingo protocol (`vlm evaluate --shots 0 4 8`), and the
options of retrieval-augmented captioning in `vlm evaluate` (`--retrieve INDEX`).

For every query image and shot count k, k demonstrations (a training image and its first
reference caption, from the `--demos` shards) precede the query in one interleaved prompt
(`vlm.retrieval.fewshot_prompt`); the model continues greedily (or with the given search options)
and the continuation's first line is the caption (`Captioner.caption_fewshot`). Demonstrations are
chosen by one or more methods:

- random: drawn uniformly without replacement by a generator seeded with (seed index, query key),
  so each query's demonstrations are reproducible whatever the batch size, query order or limit;
- rices (retrieval-based in-context example selection, as OpenFlamingo evaluates): the k training
  images most similar to the query by the index's vision tower (`--index`, built over the --demos
  shards), the most similar placed last, next to the query.

Never the query itself (excluded by key, should the query set overlap the training shards). The
demonstrations of k shots are the first k chosen for the most shots (the random draw's first k,
RICES's k best), so shot counts differ only by the demonstrations added.

0 shots is the interleaved format's plain caption prompt, `ZERO_SHOT_PROMPT`: the same for every
method and seed, so it is captioned once; RICES is deterministic and runs once; random runs once
per seed. Per method and shot count the report holds each run's metrics (`caption_metrics`; on
shapes data also the hallucination rate, `vlm.eval.hallucination`) and their mean and std over
runs (population std, as OpenFlamingo's np.std); the plot shows exact match and CIDEr-D against
shots, one line per method, +- std. Each sample of the report holds its predictions per method,
shot count and run, and the keys each run chose for the most shots, best first.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.caption import RETRIEVE_MODES, Captioner
from vlm.data.examples import CaptionExample, caption_examples, read_caption_examples
from vlm.data.pipeline import expand_shards
from vlm.errors import UserError
from vlm.eval.hallucination import hallucination_metrics
from vlm.eval.metrics import caption_metrics
from vlm.eval.plot import Series, line_chart
from vlm.retrieval import Demonstration, Entry, Index, check_fits, embed, fewshot_prompt, read_images

SELECTIONS = {"random": "uniform without replacement, seeded per (seed index, query key)",
              "rices": "the most similar training images by the index's vision tower, most similar last"}
ZERO_SHOT_PROMPT = "<|begin_of_text|><|image|>"  # the model continues with the caption and a newline
PLOTTED = {"exact_match": "exact match", "cider_d": "CIDEr-D"}
HELD_IMAGES = 512  # demonstration images read and held at once (per chunk of at least batch_size queries)
_PLACEHOLDER = object()  # an image in a prompt whose length alone is checked


@dataclass(frozen=True)
class FewShotPlan:
    """What `--shots` asks for: shot counts, selection methods, random seeds, and where the
    demonstrations come from (training caption shards; the RICES index built over them)."""

    shots: tuple[int, ...]
    select: tuple[str, ...] = ("random",)
    seeds: int = 3
    demos: tuple[str, ...] = ()
    index: str | None = None


@dataclass(frozen=True)
class RetrieveOptions:
    """What `--retrieve` asks for: the index, entries per image, and "pairs" or "captions"."""

    index: str
    k: int = 4
    mode: str = "pairs"


def random_choices(pool: Sequence[Entry], query_keys: Sequence[str], k: int, *, seed: int) -> list[list[Entry]]:
    """Per query, `k` pool entries drawn uniformly without replacement, never the query's own key,
    by a generator seeded with (`seed`, query key): the same arguments give the same entries."""
    rows = {entry.key: row for row, entry in enumerate(pool)}
    chosen = []
    for key in query_keys:
        own = {rows[key]} if key in rows else set()
        if len(pool) - len(own) < k:
            raise UserError(f"--demos holds {len(pool) - len(own)} caption sample(s) besides the query; {k} shots "
                            "need at least as many")
        drawn = random.Random(f"{seed}/{key}").sample(range(len(pool)), k + len(own))
        chosen.append([pool[row] for row in drawn if row not in own][:k])
    return chosen


def rices_choices(index: Index, tower: Any, images: Sequence[Any], query_keys: Sequence[str], k: int, *,
                  batch_size: int = 32) -> list[list[Entry]]:
    """Per query, the `k` index entries most similar to its image by `tower`, best first, never
    its own key (the prompt places them in reverse: most similar last)."""
    hits = index.search(embed(tower, images, batch_size=batch_size), k, exclude_keys=list(query_keys))
    return [[hit.entry for hit in found] for found in hits]


def fewshot_evaluate(captioner: Captioner, shards: Sequence[str | Path], plan: FewShotPlan, *,
                     limit: int | None = None, batch_size: int = 32, max_new_tokens: int = 32, progress: bool = True,
                     search: dict[str, Any] | None = None) -> dict:
    """Caption the caption samples of `shards` (at most `limit`) at every shot count of `plan` by
    every selection method, and score; returns the report (see the module docstring)."""
    search = dict(search or {})
    examples, skipped, errors = read_caption_examples(shards, limit=limit)
    start = time.perf_counter()
    runs, pool_size = _choose(captioner, examples, plan, batch_size=batch_size)
    for choices in runs.values():  # fail before any generation when the largest prompts do not fit
        _check_lengths(captioner, choices, max(plan.shots), max_new_tokens)
    positive = [k for k in plan.shots if k > 0]
    total = len(examples) * ((0 in plan.shots) + len(positive) * len(runs))
    with tqdm(total=total, unit="caption", desc="few-shot captioning", disable=not progress) as bar:
        options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, bar=bar, search=search)
        zero = _caption_run(captioner, examples, [[]] * len(examples), [0], **options) if 0 in plan.shots else {}
        captions = {run: _caption_run(captioner, examples, choices, positive, **options)
                    for run, choices in runs.items()}
    # outcomes[method][k]: one list of captions per run (0 shots: the one shared run)
    outcomes = {method: {k: [zero[0]] if k == 0 else [captions[run][k] for run in runs if run[0] == method]
                         for k in plan.shots} for method in plan.select}
    scenes = [e.scene for e in examples] if all(e.scene is not None for e in examples) else None
    references = [e.references for e in examples]
    results = {method: {str(k): _summary(outcome, references, scenes) for k, outcome in by_shots.items()}
               for method, by_shots in outcomes.items()}
    settings = {"shots": list(plan.shots), "select": list(plan.select), "seeds": plan.seeds, "demos": list(plan.demos),
                "index": plan.index, "limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                **{name: value for name, value in search.items() if name != "generator"}}
    fewshot = {"zero_shot_prompt": ZERO_SHOT_PROMPT, "selection": {m: SELECTIONS[m] for m in plan.select},
               "demonstration_pool": pool_size, "std": "population std over runs (random: one run per seed; rices "
               "and 0 shots are deterministic: one run)", "results": results}
    return {"fewshot": fewshot, "images": len(examples), "skipped": dict(skipped), "first_errors": errors,
            "seconds": round(time.perf_counter() - start, 2), "settings": settings,
            "samples": _samples(examples, outcomes, runs)}


def _samples(examples: Sequence[CaptionExample], outcomes: dict[str, dict[int, list[list[str]]]],
             runs: dict[tuple[str, int], list[list[Entry]]]) -> list[dict]:
    """Per query: its predictions per method, shot count and run, and the keys its runs chose for
    the most shots, best first."""
    samples = []
    for i, example in enumerate(examples):
        predictions = {method: {str(k): [run[i] for run in outcome] for k, outcome in by_shots.items()}
                       for method, by_shots in outcomes.items()}
        chosen = {method: [[entry.key for entry in choices[i]] for run, choices in runs.items() if run[0] == method]
                  for method in outcomes}
        samples.append({"key": example.key, "references": example.references, "predictions": predictions,
                        "demonstrations": chosen})
    return samples


def _choose(captioner: Captioner, examples: Sequence[CaptionExample], plan: FewShotPlan, *,
            batch_size: int) -> tuple[dict[tuple[str, int], list[list[Entry]]], int]:
    """Per run ((method, seed index)), each query's demonstrations for the most shots, best first;
    and the number of candidates: the index's entries when there is one (built over the --demos
    shards, checked), else the caption samples of the --demos shards."""
    k = max(plan.shots)
    if k == 0:
        return {}, 0
    keys = [e.key for e in examples]
    index = _load_index(plan) if plan.index else None
    pool = index.entries if index is not None else _read_pool(plan.demos)
    runs = {("random", seed): random_choices(pool, keys, k, seed=seed)
            for seed in range(plan.seeds) if "random" in plan.select}
    if "rices" in plan.select:
        tower = index.query_tower(captioner.model, device=captioner.device)
        runs["rices", 0] = rices_choices(index, tower, [e.image for e in examples], keys, k, batch_size=batch_size)
    return runs, len(pool)


def _load_index(plan: FewShotPlan) -> Index:
    index = Index.load(plan.index)
    built, given = sorted(index.meta.get("shards") or []), sorted(str(Path(s).resolve()) for s in plan.demos)
    if built != given:
        raise UserError(f"--index {plan.index} was built over {len(built)} shard(s) other than the {len(given)} of "
                        "--demos: random and RICES demonstrations must come from the same training shards; build "
                        "the index over --demos (vlm index build --data TRAIN_SHARDS)")
    return index


def _read_pool(shards: Sequence[str]) -> list[Entry]:
    """The demonstration candidates: every caption sample of the training shards, repeated keys skipped."""
    pool: dict[str, Entry] = {}
    skipped: Counter = Counter()
    for shard in shards:
        for example in caption_examples([shard], skipped=skipped):
            pool.setdefault(example.key, Entry(example.key, tuple(example.references), shard, example.member))
    if not pool:
        raise UserError(f"--demos: no caption samples in {len(shards)} shard(s) (skipped: {dict(skipped)})")
    return list(pool.values())


def _check_lengths(captioner: Captioner, choices: Sequence[Sequence[Entry]], k: int, max_new_tokens: int) -> None:
    for found in choices:
        demos = [Demonstration(entry.caption, _PLACEHOLDER) for entry in found[:k]]
        prompt = fewshot_prompt(captioner.tokenizer, demos, _PLACEHOLDER)
        check_fits(prompt, captioner.model, max_new_tokens=max_new_tokens, demonstrations=len(demos))


def _caption_run(captioner: Captioner, examples: Sequence[CaptionExample], choices: Sequence[Sequence[Entry]],
                 shots: Sequence[int], *, batch_size: int, max_new_tokens: int, bar: tqdm,
                 search: dict[str, Any]) -> dict[int, list[str]]:
    """Per shot count, one caption per query; the demonstration images are read per chunk of
    queries (each shard once), so at most about `HELD_IMAGES` are held."""
    captions: dict[int, list[str]] = {k: [] for k in shots}
    most = max(shots, default=0)
    step = max(batch_size, HELD_IMAGES // max(most, 1))
    for start in range(0, len(examples), step):
        queries, chosen = examples[start:start + step], choices[start:start + step]
        entries = {entry.key: entry for found in chosen for entry in found[:most]}
        pixels = dict(zip(entries, map(captioner.transform, read_images(list(entries.values())))))
        for k in shots:
            demos = [[Demonstration(entry.caption, pixels[entry.key], entry.key) for entry in reversed(found[:k])]
                     for found in chosen]
            captions[k] += captioner.caption_fewshot([q.image for q in queries], demos, max_new_tokens=max_new_tokens,
                                                     batch_size=batch_size, **search)
            bar.update(len(queries))
    return captions


def _summary(runs: Sequence[Sequence[str]], references: list[list[str]], scenes: list[dict] | None) -> dict:
    """Each run's metrics, and their mean and (population) std over the runs."""
    per_run = []
    for predictions in runs:
        metrics = caption_metrics(predictions, references)
        if scenes is not None:
            metrics["hallucination_rate"] = hallucination_metrics(predictions, scenes)["hallucination_rate"]
        per_run.append(metrics)
    names = [name for name in per_run[0] if name != "num_images"]
    return {"runs": len(per_run),
            "mean": {name: statistics.fmean(run[name] for run in per_run) for name in names},
            "std": {name: statistics.pstdev(run[name] for run in per_run) for name in names},
            "per_run": per_run}


def write_fewshot_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """`out/report.json` and `out/shots.png` (exact match and CIDEr-D vs shots); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "report.json", out / "shots.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    results, shots = report["fewshot"]["results"], report["settings"]["shots"]
    panels = [(title, [Series(method, [by_shots[str(k)]["mean"][name] for k in shots],
                              [by_shots[str(k)]["std"][name] for k in shots]) for method, by_shots in results.items()])
              for name, title in PLOTTED.items()]
    if "chance" in report["fewshot"]:  # a horizontal line under the exact-match panel's methods
        panels[0][1].append(Series("chance", [report["fewshot"]["chance"]] * len(shots), [0.0] * len(shots)))
    line_chart(panels, shots, x_label="shots").save(png_path)
    return json_path, png_path


def print_fewshot_summary(report: dict) -> None:
    """A table of mean +- std per method and shot count."""
    fewshot = report["fewshot"]
    first = next(iter(next(iter(fewshot["results"].values())).values()))
    extra = {"hallucination_rate": "hallucination", "malformed": "malformed"}
    names = {**PLOTTED, **{name: title for name, title in extra.items() if name in first["mean"]}}
    source = (f"demonstrations from {fewshot['demonstration_pool']} training images" if fewshot["demonstration_pool"]
              else f"demonstrations from each document's own rule; chance exact match {fewshot['chance']:.3f}")
    print(f"{report['images']} images, {source} (mean +- std over runs; random: {report['settings']['seeds']} "
          "seed(s)):")
    print(f"  {'select':<8}{'shots':>6}" + "".join(f"{title:>20}" for title in names.values()))
    for method, by_shots in fewshot["results"].items():
        for k, result in by_shots.items():
            cells = "".join(f"{result['mean'][name]:>11.3f} +- {result['std'][name]:.3f}" for name in names)
            print(f"  {method:<8}{k:>6}{cells}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vlm evaluate` for in-context captioning: few-shot evaluation and retrieval."""
    shots = parser.add_argument_group("few-shot evaluation (the OpenFlamingo protocol; see vlm.eval.fewshot)")
    shots.add_argument("--shots", type=int, nargs="+", default=None, metavar="K",
                       help=f"shot counts, e.g. 0 4 8; 0 shots is the interleaved caption prompt {ZERO_SHOT_PROMPT}. "
                            "Writes report.json and shots.png")
    shots.add_argument("--select", nargs="+", choices=list(SELECTIONS), default=None,
                       help="how demonstrations are chosen, one or more (default: random)")
    shots.add_argument("--seeds", type=int, default=None, metavar="N", help="random selection's seeds (default 3)")
    shots.add_argument("--demos", nargs="+", default=None, metavar="TRAIN_SHARDS",
                       help="training caption shards the demonstrations come from (paths or globs); without it, "
                            "--data must be shapes few-shot documents, each captioned after its own demonstrations")
    shots.add_argument("--index", default=None, metavar="INDEX",
                       help="for --select rices: an index over the --demos shards (vlm index build)")
    retrieve = parser.add_argument_group("retrieval-augmented captioning")
    retrieve.add_argument("--retrieve", default=None, metavar="INDEX",
                          help="the -k entries of INDEX most similar to each image (never itself) enter its prompt; "
                               "their keys are stored per sample as its sources")
    retrieve.add_argument("-k", type=int, default=None, help="entries retrieved per image (default 4)")
    retrieve.add_argument("--retrieve-mode", choices=list(RETRIEVE_MODES), default=None,
                          help="pairs: image+caption demonstrations (default); captions: the captions alone")


def fewshot_plan(args: argparse.Namespace) -> FewShotPlan | None:
    """The few-shot plan of `add_arguments`'s options, None without --shots; UserError (one line)
    for options that do not go together."""
    if args.shots is None:
        if any(value is not None for value in (args.select, args.seeds, args.demos, args.index)):
            raise UserError("--select, --seeds, --demos and --index are options of few-shot evaluation; add --shots")
        return None
    if min(args.shots) < 0:
        raise UserError(f"--shots must be >= 0, got {min(args.shots)}")
    if args.baselines or args.retrieve is not None:
        raise UserError("--shots is its own protocol: drop --baselines and --retrieve (they score the plain "
                        "caption prompt)")
    select = tuple(dict.fromkeys(args.select or ["random"]))
    if not args.demos and (args.select or args.index):
        raise UserError("--select and --index choose demonstrations from --demos TRAIN_SHARDS; without --demos, "
                        "--shots evaluates shapes few-shot documents with their own demonstrations")
    if "rices" in select and not args.index:
        raise UserError("--select rices needs --index INDEX: an index over the --demos shards (vlm index build)")
    if args.index and "rices" not in select:
        raise UserError("--index is used by --select rices only; add --select rices (or random rices)")
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    demos = expand_shards(args.demos) if args.demos else []
    missing = [s for s in demos if not Path(s).is_file()]
    if args.demos and (not demos or missing):
        raise UserError(f"--demos: no training shard at {missing[:3] or args.demos}")
    return FewShotPlan(tuple(sorted(set(args.shots))), select, args.seeds or 3, tuple(demos), args.index)


def retrieve_options(args: argparse.Namespace) -> RetrieveOptions | None:
    """The retrieval options of `add_arguments`, None without --retrieve; UserError for bad ones."""
    if args.retrieve is None:
        if args.k is not None or args.retrieve_mode is not None:
            raise UserError("-k and --retrieve-mode choose what --retrieve INDEX puts in the prompt; add --retrieve")
        return None
    if args.k is not None and args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    return RetrieveOptions(args.retrieve, args.k or 4, args.retrieve_mode or "pairs")
