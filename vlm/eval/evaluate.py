"""`vlm evaluate --model D --data SHARDS`: caption the images of caption shards, score the captions
against their references (exact match, BLEU-4, CIDEr-D), and write a JSON report and a PNG grid.

With `--baselines --train TRAIN_SHARDS` the same metrics are computed for two baselines, in the
report's "baselines" section and in a table on the console: the most frequent training caption for
every image, and the caption of the training image nearest to each image by the model's own vision
tower (mean-pooled tokens, cosine similarity; see vlm.eval.baselines).

On the synthetic shapes data (samples whose json holds their `scene`), the report also has the
hallucination rate: the share of captions that contradict their image in some attribute (see
vlm.eval.hallucination), with the attribute of each wrong caption in its sample entry.

With `--shots 0 4 8 --demos TRAIN_SHARDS [--select random rices --index INDEX] [--seeds 3]` the
model is evaluated few-shot instead, by the OpenFlamingo protocol (vlm.eval.fewshot): report.json
holds mean and std over seeds per selection method and shot count, and shots.png plots exact match
and CIDEr-D against shots. Without --demos, `--data` holds shapes few-shot documents (vlm data
shapes --variants fewshot) and each query is captioned after k demonstrations of its own document's
rule (vlm.eval.episodes), with the chance rate in the report and the plot. With `--retrieve INDEX [-k 4] [--retrieve-mode pairs|captions]` every
image is captioned after the k most similar index entries (never itself), and each sample of the
report lists them as its "sources".

Samples that cannot be used are skipped and counted by reason; the first error of each reason (e.g.
an image over the pixel limit every vlm command applies, `DEFAULT_MAX_PIXELS`) is printed on stderr,
naming the shard, sample and member."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlm.caption import Captioner
from vlm.data.decode import SampleError
from vlm.data.examples import CaptionExample, caption_examples, read_caption_examples  # noqa: F401 (imported from here)
from vlm.data.features import FeatureStore
from vlm.data.pipeline import expand_shards
from vlm.errors import UserError
from vlm.eval.baselines import embed_images, most_frequent_caption, nearest_neighbours, pool_tokens
from vlm.eval.episodes import episode_evaluate
from vlm.eval.fewshot import (RetrieveOptions, add_arguments, fewshot_evaluate, fewshot_plan, print_fewshot_summary,
                              retrieve_options, write_fewshot_report)
from vlm.eval.grid import caption_grid
from vlm.eval.hallucination import caption_errors, hallucination_metrics
from vlm.eval.metrics import caption_metrics, normalise_caption
from vlm.eval.vqa import check_vqa_options, finish_vqa, vqa_evaluate
from vlm.features import fingerprint
from vlm.retrieval import Index


def evaluate(captioner: Captioner, shards: Sequence[str | Path], *, limit: int | None = None, batch_size: int = 32,
             max_new_tokens: int = 32, progress: bool = True, search: Mapping[str, Any] | None = None,
             train_shards: Sequence[str | Path] | None = None, train_limit: int | None = None,
             train_features: FeatureStore | None = None, retrieve: RetrieveOptions | None = None) -> dict:
    """Caption every example and score; returns the report (metrics, counts, per-sample results).

    `search`: keyword arguments of `Captioner.caption` for the decoding (num_beams, length_penalty,
    no_repeat_ngram_size, repetition_penalty), recorded in the report's settings. With
    `train_shards`, the report also has a "baselines" section (see `score_baselines`; `train_features`:
    the training images' tower outputs from a feature cache instead of running the tower). With
    `retrieve`, each image is captioned after the entries of that index most similar to it
    (`Captioner.caption_retrieved`, never its own key); samples then list their "sources"."""
    search = dict(search or {})
    examples, skipped, errors = read_caption_examples(shards, limit=limit)
    start = time.perf_counter()
    if retrieve is not None:
        index = Index.load(retrieve.index)
        tower = index.query_tower(captioner.model, device=captioner.device)
    predictions: list[str] = []
    sources: list[list[str]] = []
    bar = tqdm(total=len(examples), unit="image", desc="captioning", disable=not progress)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        images = [e.image for e in chunk]
        if retrieve is None:
            predictions += captioner.caption(images, max_new_tokens=max_new_tokens, batch_size=batch_size, **search)
        else:
            found = captioner.caption_retrieved(images, index, k=retrieve.k, mode=retrieve.mode, tower=tower,
                                                exclude_keys=[e.key for e in chunk], max_new_tokens=max_new_tokens,
                                                batch_size=batch_size, **search)
            predictions += [c.text for c in found]
            sources += [list(c.sources) for c in found]
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    metrics = caption_metrics(predictions, [e.references for e in examples])
    samples = [{"key": e.key, "prediction": p, "references": e.references,
                "exact": normalise_caption(p) in {normalise_caption(r) for r in e.references}}
               for e, p in zip(examples, predictions)]
    report: dict[str, Any] = {"metrics": metrics}
    if all(e.scene is not None for e in examples):  # shapes data: every caption can be checked
        report["hallucination"] = hallucination_metrics(predictions, [e.scene for e in examples])
        for sample, example in zip(samples, examples):
            sample["errors"] = caption_errors(sample["prediction"], example.scene)
    settings = {"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens, **search}
    if retrieve is not None:
        settings["retrieve"] = {"index": str(retrieve.index), "k": retrieve.k, "mode": retrieve.mode}
        for sample, keys in zip(samples, sources):
            sample["sources"] = keys
    if train_shards is not None:
        settings["train_limit"] = train_limit
        report["baselines"], retrieved = score_baselines(captioner, examples, train_shards, limit=train_limit,
                                                         batch_size=batch_size, progress=progress,
                                                         features=train_features)
        for sample, nearest in zip(samples, retrieved):
            sample["retrieved"] = nearest
    return {**report, "images": len(examples), "skipped": dict(skipped), "first_errors": errors,
            "seconds": round(seconds, 2), "images_per_second": round(len(examples) / seconds, 2),
            "settings": settings, "samples": samples, "_examples": examples}


def score_baselines(captioner: Captioner, examples: Sequence[CaptionExample], train_shards: Sequence[str | Path], *,
                    limit: int | None = None, batch_size: int = 32, progress: bool = True,
                    features: FeatureStore | None = None) -> tuple[dict, list[dict]]:
    """Metrics of the most frequent training caption and of nearest-neighbour caption retrieval by the
    model's vision tower, on `examples`; training samples are read from `train_shards` (at most
    `limit`) by the reader used for validation, streamed, so only their embeddings are kept.
    With `features` (a cache of this tower's outputs, `vlm features build`), the training images'
    embeddings are pooled from the cache instead of running the tower over them.

    Returns the report's "baselines" section and, per example, the training image retrieved for it
    ({"key", "caption", "similarity"})."""
    skipped: Counter = Counter()
    errors: dict[str, str] = {}
    train_keys: list[str] = []
    train_captions: list[str] = []  # the first reference of each training image: what retrieval returns
    all_captions: list[str] = []  # every reference: what the most frequent caption is counted over

    def train_examples() -> Iterator[CaptionExample]:  # streamed: only the keys and captions are kept
        for example in caption_examples(train_shards, limit=limit, skipped=skipped, errors=errors):
            train_keys.append(example.key)
            train_captions.append(example.references[0])
            all_captions.extend(example.references)
            yield example

    start = time.perf_counter()
    if features is not None:
        train_features = _cached_embeddings(features, train_examples())
    else:
        train_features = embed_images(captioner.model, (e.image for e in train_examples()), batch_size=batch_size,
                                      total=limit, progress=progress, desc="embedding train images")
    if not train_keys:
        first = "".join(f"; first {reason}: {message}" for reason, message in errors.items())
        raise UserError(f"no caption samples in the training shards {[str(s) for s in train_shards][:3]} "
                        f"(skipped: {dict(skipped)}{first})")
    features = embed_images(captioner.model, [e.image for e in examples], batch_size=batch_size,
                            progress=progress, desc="embedding eval images")
    device = next(captioner.model.parameters()).device  # the search runs where the model does
    similarity, nearest = nearest_neighbours(features, train_features, k=1, device=device)
    references = [e.references for e in examples]
    common = most_frequent_caption(all_captions)
    retrieved = [train_captions[i] for i in nearest[:, 0].tolist()]
    section = {
        "train_images": len(train_keys), "train_shards": [str(s) for s in train_shards],
        "train_skipped": dict(skipped), "train_first_errors": errors,
        "seconds": round(time.perf_counter() - start, 2),
        "most_frequent": {"caption": common, "metrics": caption_metrics([common] * len(examples), references)},
        "retrieval": {
            "features": "vision tower output tokens, mean-pooled, L2-normalised; cosine similarity, exact search",
            "metrics": caption_metrics(retrieved, references),
        },
    }
    per_example = [{"key": train_keys[i], "caption": train_captions[i], "similarity": round(s, 6)}
                   for i, s in zip(nearest[:, 0].tolist(), similarity[:, 0].tolist())]
    return section, per_example


def _cached_embeddings(features: FeatureStore, examples: Iterator[CaptionExample]) -> torch.Tensor:
    """Pooled embeddings of the examples' images from a feature cache of the model's tower."""
    rows = []
    for example in examples:
        try:
            tokens = features.get(example.key, example.member)
        except SampleError:
            raise UserError(f"--features {features.root} has no features for training sample {example.key!r}: "
                            "build the cache over the --train shards") from None
        rows.append(pool_tokens(tokens[None]))
    return torch.cat(rows) if rows else torch.zeros(0, int(features.fingerprint["dim"]))


def write_report(report: dict, out: str | Path, *, grid_images: int = 16) -> tuple[Path, Path]:
    """`out/report.json` and `out/captions.png`; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples = report.pop("_examples")
    json_path, png_path = out / "report.json", out / "captions.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    items = [(e.image, s["prediction"], e.references[0]) for e, s in zip(examples[:grid_images], report["samples"])]
    caption_grid(items).save(png_path)
    return json_path, png_path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a directory written by `vlm export`")
    parser.add_argument("--data", required=True, nargs="+", help="caption shards (paths or globs)")
    parser.add_argument("--out", default=None, help="report folder (default: MODEL/eval)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1, metavar="N",
                        help="beam search over N beams (default 1: greedy); each image takes N rows of a batch")
    parser.add_argument("--length-penalty", type=float, default=1.0, metavar="F",
                        help="beam score = sum of log-probs / length ** F (default 1.0; > 0 favours longer captions)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                        help="never repeat an n-gram of N tokens within a caption (default 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="F",
                        help="> 1 makes tokens already in the caption less likely (default 1.0: off)")
    parser.add_argument("--baselines", action="store_true",
                        help="also score the most frequent training caption and nearest-neighbour retrieval of "
                             "training captions by the model's vision tower (needs --train)")
    parser.add_argument("--train", nargs="+", default=None, metavar="TRAIN_SHARDS",
                        help="training caption shards (paths or globs) the baselines draw their captions from")
    parser.add_argument("--train-limit", type=int, default=None, metavar="N",
                        help="read at most this many training images for the baselines (default: all)")
    parser.add_argument("--features", default=None, metavar="DIR",
                        help="a feature cache of the model's tower over the --train shards (vlm features build): "
                             "retrieval reads the training images' embeddings from it instead of running the tower")
    add_arguments(parser)  # --shots ... and --retrieve ... (vlm.eval.fewshot)
    parser.add_argument("--task", choices=("caption", "vqa"), default="caption",
                        help="caption (default): caption shards, caption metrics; vqa: every question of chat shards "
                             "answered and scored by VQA accuracy with its answer normalisation (vlm.eval.vqa)")
    return parser


def _search(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options given to `Captioner.caption`; UserError for values it would refuse."""
    if (args.num_beams < 1 or args.no_repeat_ngram_size < 0 or not args.repetition_penalty > 0
            or not math.isfinite(args.length_penalty)):
        raise UserError("--num-beams must be >= 1, --no-repeat-ngram-size >= 0, --repetition-penalty > 0 "
                        "and --length-penalty a finite number")
    return {"num_beams": args.num_beams, "length_penalty": args.length_penalty,
            "no_repeat_ngram_size": args.no_repeat_ngram_size, "repetition_penalty": args.repetition_penalty}


def _train_shards(args: argparse.Namespace) -> list[str] | None:
    """The training shards for the baselines, None without --baselines; UserError for bad combinations."""
    if args.baselines and not args.train:
        raise UserError("--baselines needs --train TRAIN_SHARDS: the training caption shards the baselines use")
    if not args.baselines:
        if args.train or args.train_limit is not None:
            raise UserError("--train and --train-limit are only used with --baselines; add --baselines")
        return None
    if args.train_limit is not None and args.train_limit < 1:
        raise UserError(f"--train-limit must be >= 1, got {args.train_limit}")
    shards = expand_shards(args.train)
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise UserError(f"--train: no training shard at {missing[:3] or args.train}")
    return shards


def _print_summary(report: dict) -> None:
    m = report["metrics"]
    if "hallucination" in report:
        h = report["hallucination"]
        wrong = ", ".join(f"{name} {share:.1%}" for name, share in h["by_attribute"].items() if share)
        print(f"hallucination: {h['hallucination_rate']:.1%} of captions contradict their image"
              f"{f' ({wrong})' if wrong else ''}; malformed {h['malformed_rate']:.1%}")
    if "baselines" not in report:
        print(f"{report['images']} images: exact match {m['exact_match']:.3f}, BLEU-4 {m['bleu4']:.3f}, "
              f"CIDEr-D {m['cider_d']:.3f}")
        return
    baselines = report["baselines"]
    print(f"{report['images']} images, baselines from {baselines['train_images']} training images:")
    rows = [("model", m), ("most frequent", baselines["most_frequent"]["metrics"]),
            ("retrieval", baselines["retrieval"]["metrics"])]
    print(f"  {'':<14}{'exact match':>12}{'BLEU-4':>9}{'CIDEr-D':>9}")
    for name, metrics in rows:
        print(f"  {name:<14}{metrics['exact_match']:>12.3f}{metrics['bleu4']:>9.3f}{metrics['cider_d']:>9.3f}")
    print(f"  most frequent training caption: {baselines['most_frequent']['caption']!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        search, train_shards = _search(args), _train_shards(args)
        plan, retrieve = fewshot_plan(args), retrieve_options(args)
        shards = expand_shards(args.data)
        missing = [s for s in shards if not Path(s).is_file()]
        if not shards or missing:
            raise FileNotFoundError(f"no shard at {missing[:3] or args.data}")
        if args.features and not args.baselines:
            raise UserError("--features is only used by the retrieval baseline; add --baselines --train TRAIN_SHARDS")
        if args.task == "vqa":
            check_vqa_options(args)
        captioner = Captioner.from_directory(args.model)
        if args.task == "vqa":
            report = vqa_evaluate(captioner, shards, limit=args.limit, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, search=search)
        elif plan is not None and not plan.demos:  # shapes few-shot documents, each with its own demonstrations
            report = episode_evaluate(captioner, shards, plan.shots, seeds=plan.seeds, limit=args.limit,
                                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, search=search)
        elif plan is not None:
            report = fewshot_evaluate(captioner, shards, plan, limit=args.limit, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens, search=search)
        else:
            report = evaluate(captioner, shards, limit=args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, search=search, train_shards=train_shards,
                              train_limit=args.train_limit, train_features=_feature_store(args, captioner),
                              retrieve=retrieve)
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"vlm evaluate: {err}", file=sys.stderr)
        return 2
    out = args.out or Path(args.model) / "eval"
    if args.task == "vqa":
        return finish_vqa(report, out)
    if plan is not None:
        return _finish_fewshot(report, out)
    _print_skips("", report["skipped"], report["first_errors"])
    if "baselines" in report:
        _print_skips("training shards: ", report["baselines"]["train_skipped"], report["baselines"]["train_first_errors"])
    json_path, png_path = write_report(report, out)
    _print_summary(report)
    print(f"report: {json_path}\ngrid:   {png_path}")
    return 0


def _feature_store(args: argparse.Namespace, captioner: Captioner) -> FeatureStore | None:
    """The --features cache, checked against the model's tower; None without --features."""
    if not args.features:
        return None
    dtype = next(captioner.model.vision.parameters()).dtype
    precision = {torch.bfloat16: "bf16-true", torch.float16: "16-true"}.get(dtype, "32-true")
    return FeatureStore(args.features, expected=fingerprint(captioner.model, precision))


def _finish_fewshot(report: dict, out: str | Path) -> int:
    _print_skips("", report["skipped"], report["first_errors"])
    json_path, png_path = write_fewshot_report(report, out)
    print_fewshot_summary(report)
    print(f"report: {json_path}\nplot:   {png_path}")
    return 0


def _print_skips(prefix: str, skipped: dict[str, int], errors: dict[str, str]) -> None:
    for reason, message in errors.items():
        print(f"vlm evaluate: {prefix}skipped {skipped[reason]} sample(s), the first: {message}", file=sys.stderr)
