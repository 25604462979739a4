"""`vlm evaluate --model D --data SHARDS`: caption the images of caption shards, score the captions
against their references (exact match, BLEU-4, CIDEr-D), and write a JSON report and a PNG grid.

Samples that cannot be used are skipped and counted by reason; the first error of each reason (e.g.
an image over the pixel limit every vlm command applies, `DEFAULT_MAX_PIXELS`) is printed on stderr,
naming the shard, sample and member."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from vlm.caption import Captioner
from vlm.data.decode import IMAGE_EXTENSIONS, SampleError, decode_sample, iter_shard_samples
from vlm.data.formats import sample_kind
from vlm.data.pipeline import expand_shards
from vlm.eval.grid import caption_grid
from vlm.eval.metrics import caption_metrics, normalise_caption


@dataclass
class CaptionExample:
    key: str
    image: Image.Image
    references: list[str]


def caption_examples(shards: Sequence[str | Path], *, limit: int | None = None, skipped: Counter | None = None,
                     errors: dict[str, str] | None = None) -> Iterator[CaptionExample]:
    """Caption samples of the shards, in order; other kinds and bad samples are counted in `skipped`,
    and `errors` keeps the first bad sample's message per reason."""
    skipped = skipped if skipped is not None else Counter()
    errors = errors if errors is not None else {}
    count = 0
    for shard in shards:
        with open(shard, "rb") as stream:
            for raw in iter_shard_samples(stream, str(shard), max_member_bytes=64 * 2**20):
                example = _example(raw, skipped, errors)
                if example is None:
                    continue
                yield example
                count += 1
                if limit is not None and count >= limit:
                    return


def _example(raw: dict, skipped: Counter, errors: dict[str, str]) -> CaptionExample | None:
    try:
        if "__error__" in raw:
            raise raw["__error__"]
        sample = decode_sample(raw)  # images over DEFAULT_MAX_PIXELS are refused from their header
    except SampleError as error:
        skipped[error.reason] += 1
        errors.setdefault(error.reason, str(error))
        return None
    if sample_kind(sample) != "caption":
        skipped[f"not a caption sample ({sample_kind(sample)})"] += 1
        return None
    images = [sample[k] for k in sample if k in IMAGE_EXTENSIONS]
    meta = sample.get("json") or {}
    references = meta.get("captions") or ([meta["caption"]] if "caption" in meta else []) or ([sample["txt"]] if "txt" in sample else [])
    if len(images) != 1 or not references:
        skipped["missing image or caption"] += 1
        return None
    return CaptionExample(sample["__key__"], images[0], [r.strip() for r in references])


def evaluate(captioner: Captioner, shards: Sequence[str | Path], *, limit: int | None = None, batch_size: int = 32,
             max_new_tokens: int = 32, progress: bool = True) -> dict:
    """Caption every example and score; returns the report (metrics, counts, per-sample results)."""
    skipped: Counter = Counter()
    errors: dict[str, str] = {}
    examples = list(caption_examples(shards, limit=limit, skipped=skipped, errors=errors))
    if not examples:
        first = "".join(f"; first {reason}: {message}" for reason, message in errors.items())
        raise ValueError(f"no caption samples in {[str(s) for s in shards]} (skipped: {dict(skipped)}{first})")
    start = time.perf_counter()
    predictions: list[str] = []
    bar = tqdm(total=len(examples), unit="image", desc="captioning", disable=not progress)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        predictions += captioner.caption([e.image for e in chunk], max_new_tokens=max_new_tokens, batch_size=batch_size)
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    metrics = caption_metrics(predictions, [e.references for e in examples])
    samples = [{"key": e.key, "prediction": p, "references": e.references,
                "exact": normalise_caption(p) in {normalise_caption(r) for r in e.references}}
               for e, p in zip(examples, predictions)]
    return {"metrics": metrics, "images": len(examples), "skipped": dict(skipped), "first_errors": errors,
            "seconds": round(seconds, 2), "images_per_second": round(len(examples) / seconds, 2),
            "samples": samples, "_examples": examples}


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm evaluate", description=__doc__)
    parser.add_argument("--model", required=True, help="a directory written by `vlm export`")
    parser.add_argument("--data", required=True, nargs="+", help="caption shards (paths or globs)")
    parser.add_argument("--out", default=None, help="report folder (default: MODEL/eval)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        shards = expand_shards(args.data)
        missing = [s for s in shards if not Path(s).is_file()]
        if not shards or missing:
            raise FileNotFoundError(f"no shard at {missing[:3] or args.data}")
        report = evaluate(Captioner.from_directory(args.model), shards, limit=args.limit, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens)
    except (FileNotFoundError, ValueError) as err:
        print(f"vlm evaluate: {err}", file=sys.stderr)
        return 2
    for reason, message in report["first_errors"].items():
        count = report["skipped"][reason]
        print(f"vlm evaluate: skipped {count} sample(s), the first: {message}", file=sys.stderr)
    json_path, png_path = write_report(report, args.out or Path(args.model) / "eval")
    m = report["metrics"]
    print(f"{report['images']} images: exact match {m['exact_match']:.3f}, BLEU-4 {m['bleu4']:.3f}, CIDEr-D {m['cider_d']:.3f}")
    print(f"report: {json_path}\ngrid:   {png_path}")
    return 0
