"""Few-shot evaluation on the shapes few-shot documents (`vlm evaluate --data FEWSHOT_VAL --shots 0 1 2 4 8`).

A held-out document (`vlm.data.shapes_fewshot`) names its colours with made-up words that no
training document gives them; its last image, the query, can be captioned only by reading the
document's earlier image-caption pairs. For k shots, each document is rebuilt by the generator
that wrote it (`fewshot_episode`, with the seed and image size of the data's manifest.json):
the same rule and query, k demonstrations of its own rule (draw s for seed s, showing every
colour of the query), then the query. The model continues greedily (or with the given search
options) and the caption is the continuation's first line (`Captioner.caption_fewshot`).

0 shots is the query alone (`<|begin_of_text|><|image|>`, deterministic: captioned once); each
k > 0 runs once per seed. Per shot count the report holds each run's metrics (`caption_metrics`,
and `malformed`: the share of captions that are not a caption in the document's words), their mean
and population std, and `chance`: the mean exact-match rate of a guesser that reads each image
perfectly and draws each colour's word from those the split allows (`chance_exact_match`).
"""

from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from vlm.caption import Captioner
from vlm.data.decode import iter_shard_samples
from vlm.data.shapes_fewshot import fewshot_episode, read_caption
from vlm.errors import UserError
from vlm.eval.metrics import caption_metrics
from vlm.retrieval import Demonstration

METHOD = "document"  # the report's one selection method: the document's own demonstrations
DESCRIPTION = "the query's own document rebuilt with k demonstrations of its rule (draw = seed index)"


@dataclass(frozen=True)
class Document:
    """A few-shot document of the shards: where the generator finds it again, and its query's truth."""

    key: str
    split: str
    index: int
    rule: dict
    reference: str  # the query's caption in the document's words
    chance: float


@dataclass(frozen=True)
class Generator:
    """The shapes generator's settings that wrote the shards (their manifest.json)."""

    seed: int
    image_size: int


def is_fewshot_document(meta: Any) -> bool:
    """Whether a sample's json is a shapes few-shot document's."""
    return isinstance(meta, dict) and {"rule", "scenes", "segments"} <= meta.keys()


def read_documents(shards: Sequence[str | Path], *, limit: int | None = None) -> tuple[list[Document], Generator]:
    """The few-shot documents of `shards` (at most `limit`) and the generator settings of their
    manifest; UserError naming the shard and sample when a sample is not one."""
    documents: list[Document] = []
    for shard in shards:
        with open(shard, "rb") as stream:
            for raw in iter_shard_samples(stream, str(shard), max_member_bytes=64 * 2**20):
                documents.append(_document(raw, shard))
                if limit is not None and len(documents) >= limit:
                    return documents, read_generator(shards[0])
    if not documents:
        raise UserError(f"no few-shot documents in {[str(s) for s in shards]}")
    return documents, read_generator(shards[0])


def _document(raw: dict, shard: str | Path) -> Document:
    key = raw.get("__key__", "?")
    try:
        if "__error__" in raw:
            raise ValueError(str(raw["__error__"]))
        meta = json.loads(raw["json"])
        split, index = key.rsplit("_", 1)
        if not is_fewshot_document(meta):
            raise ValueError("its json has no rule, scenes and segments")
        return Document(key, split, int(index), meta["rule"], meta["scenes"][-1]["text"], float(meta["chance"]))
    except (KeyError, ValueError, IndexError, TypeError) as error:
        raise UserError(f"{shard}: sample {key!r} is not a shapes few-shot document ({error}); --shots without "
                        "--demos evaluates those (vlm data shapes --variants fewshot); give --demos TRAIN_SHARDS "
                        "for caption shards") from None


def read_generator(shard: str | Path) -> Generator:
    """The seed and image size of the manifest.json above a shapes shard (DIR/fewshot/val-*.tar)."""
    path = Path(shard).resolve().parent.parent / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        return Generator(int(manifest["seed"]), int(manifest["image_size"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: the shapes manifest (seed, image_size) that rebuilds the few-shot documents "
                        f"of {shard} cannot be read ({error})") from None


def episode(document: Document, generator: Generator, shots: int, draw: int
            ) -> tuple[list[Demonstration], Image.Image]:
    """The document's `shots` demonstrations of draw `draw` (PIL images and captions, in order)
    and its query image; UserError when the generator no longer writes this document."""
    sample = fewshot_episode(seed=generator.seed, split=document.split, index=document.index, shots=shots,
                             draw=draw, image_size=generator.image_size)
    meta = sample["json"]
    if meta["rule"] != document.rule or meta["scenes"][-1]["text"] != document.reference:
        raise UserError(f"sample {document.key!r}: the shapes generator (seed {generator.seed}) rebuilds another "
                        "document than the shard's; regenerate the data with this version of vlm")
    images = [Image.open(io.BytesIO(sample[f"{i}.png"])).convert("RGB") for i in range(shots + 1)]
    demos = [Demonstration(scene["text"], image) for scene, image in zip(meta["scenes"][:-1], images)]
    return demos, images[-1]


def episode_evaluate(captioner: Captioner, shards: Sequence[str | Path], shots: Sequence[int], *, seeds: int = 3,
                     limit: int | None = None, batch_size: int = 32, max_new_tokens: int = 32,
                     progress: bool = True, search: dict[str, Any] | None = None) -> dict:
    """Caption the query of every few-shot document of `shards` (at most `limit`) after k of its
    own demonstrations, for each k of `shots` (k > 0: once per seed), and score; returns a report
    in the layout of `vlm.eval.fewshot` (one method, "document"), which its writers print and plot."""
    search = dict(search or {})
    documents, generator = read_documents(shards, limit=limit)
    shots = sorted(set(shots))
    runs = [(k, draw) for k in shots for draw in range(1 if k == 0 else seeds)]
    start = time.perf_counter()
    predictions: dict[tuple[int, int], list[str]] = {}
    with tqdm(total=len(documents) * len(runs), unit="caption", desc="few-shot episodes", disable=not progress) as bar:
        for k, draw in runs:
            predictions[k, draw] = _caption_run(captioner, documents, generator, k, draw, batch_size=batch_size,
                                                max_new_tokens=max_new_tokens, bar=bar, search=search)
    results = {str(k): _summary([predictions[run] for run in runs if run[0] == k], documents) for k in shots}
    settings = {"shots": shots, "seeds": seeds, "limit": limit, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "generator": {"seed": generator.seed, "image_size": generator.image_size},
                **{name: value for name, value in search.items() if name != "generator"}}
    fewshot = {"zero_shot_prompt": "<|begin_of_text|><|image|>", "selection": {METHOD: DESCRIPTION},
               "demonstration_pool": 0, "chance": statistics.fmean(d.chance for d in documents),
               "std": "population std over runs (one per seed; 0 shots: one run)", "results": {METHOD: results}}
    samples = [{"key": d.key, "references": [d.reference], "rule": d.rule,
                "predictions": {METHOD: {str(k): [predictions[run][i] for run in runs if run[0] == k] for k in shots}}}
               for i, d in enumerate(documents)]
    return {"fewshot": fewshot, "images": len(documents), "skipped": {}, "first_errors": {},
            "seconds": round(time.perf_counter() - start, 2), "settings": settings, "samples": samples}


def _caption_run(captioner: Captioner, documents: Sequence[Document], generator: Generator, shots: int, draw: int, *,
                 batch_size: int, max_new_tokens: int, bar: tqdm, search: dict[str, Any]) -> list[str]:
    """One caption per document for `shots` demonstrations of draw `draw`, a batch of episodes at a time."""
    captions: list[str] = []
    for start in range(0, len(documents), batch_size):
        episodes = [episode(d, generator, shots, draw) for d in documents[start:start + batch_size]]
        captions += captioner.caption_fewshot([query for _, query in episodes], [demos for demos, _ in episodes],
                                              max_new_tokens=max_new_tokens, batch_size=batch_size, **search)
        bar.update(len(episodes))
    return captions


def malformed_rate(predictions: Sequence[str], documents: Sequence[Document]) -> float:
    """Share of predictions that are not a caption in their document's words (`read_caption` fails)."""
    bad = 0
    for text, document in zip(predictions, documents, strict=True):
        try:
            read_caption(text, document.rule)
        except ValueError:
            bad += 1
    return bad / len(documents)


def _summary(runs: Sequence[Sequence[str]], documents: Sequence[Document]) -> dict:
    """Each run's metrics, and their mean and (population) std over the runs."""
    references = [[d.reference] for d in documents]
    per_run = [{**caption_metrics(list(run), references), "malformed": malformed_rate(run, documents)} for run in runs]
    names = [name for name in per_run[0] if name != "num_images"]
    return {"runs": len(per_run),
            "mean": {name: statistics.fmean(run[name] for run in per_run) for name in names},
            "std": {name: statistics.pstdev(run[name] for run in per_run) for name in names},
            "per_run": per_run}
