"""VQA scoring (`vlm evaluate --task vqa`): short answers to the questions of chat shards.

Every assistant turn of a chat sample is one question: the model answers the conversation up to it
(earlier answers are the reference ones) and its answer is scored with the VQA accuracy:

- answers are normalised the way the VQA evaluation normalises them (`normalise_answer`): lower
  case; punctuation removed (a comma inside a number such as "1,000" is dropped, other marks become
  spaces unless next to a space, a full stop is kept only before a digit); number words "zero" to
  "ten" (and "none") become digits; the articles a / an / the are dropped; contractions written
  without their apostrophe get it back ("dont" -> "don't");
- with ten (at least `HUMAN_ANSWERS_MIN`) human answers, as in VQAv2, a prediction scores
  min(1, matches / 3) averaged over the leave-one-out subsets of the answers; with fewer (the shapes
  chat variant has one exact answer per question) it scores 1 when it equals a normalised answer.

The report has the mean accuracy, the exact match before normalisation, the accuracy per answer
type (yes/no, number, other, by the first reference), and every question with its prediction.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from vlm.caption import Captioner
from vlm.data.decode import SampleError, decode_sample, iter_shard_samples
from vlm.data.formats import indexed_images, sample_kind
from vlm.errors import UserError
from vlm.text.chat import count_images

HUMAN_ANSWERS_MIN = 3  # below this many references an answer is right or wrong, not a share of annotators
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = ("ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't",
                 "hasn't", "haven't", "he'd", "he'll", "he's", "how'd", "how'll", "how's", "i'd", "i'll", "i'm", "i've",
                 "isn't", "it'd", "it'll", "it's", "let's", "ma'am", "might've", "mightn't", "must've", "mustn't",
                 "needn't", "o'clock", "shan't", "she'd", "she'll", "she's", "should've", "shouldn't", "that's",
                 "there'd", "there's", "they'd", "they'll", "they're", "they've", "wasn't", "we'd", "we'll", "we're",
                 "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
                 "who'd", "who'll", "who's", "who've", "why's", "won't", "would've", "wouldn't", "y'all", "you'd",
                 "you'll", "you're", "you've")
_RESTORED = {word.replace("'", ""): word for word in _CONTRACTIONS}
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_NUMBER_COMMA = re.compile(r"(\d),(\d)")
_FULL_STOP = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit ("3.5" keeps its point)


def normalise_answer(text: str) -> str:
    """The VQA evaluation's normalisation of an answer (module docstring)."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip().lower())
    words = [_NUMBERS.get(word, word) for word in text.split()]
    words = [_RESTORED.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def _strip_punctuation(text: str) -> str:
    """Each mark is dropped where the original text has it next to a space (or has a number with a
    comma anywhere), else replaced by a space; then full stops not before a digit are dropped."""
    drop_all = _NUMBER_COMMA.search(text) is not None  # "1,000": every mark goes without a trace
    out = text
    for mark in _PUNCTUATION:
        spaced = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if spaced or drop_all else " ")
    return _FULL_STOP.sub("", out)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its reference answers (module docstring)."""
    if not answers:
        raise ValueError("a question needs at least one reference answer")
    predicted = normalise_answer(prediction)
    normalised = [normalise_answer(a) for a in answers]
    if len(normalised) < HUMAN_ANSWERS_MIN:
        return float(predicted in normalised)
    shares = [min(1.0, sum(a == predicted for j, a in enumerate(normalised) if j != left_out) / 3)
              for left_out in range(len(normalised))]
    return sum(shares) / len(shares)


def answer_type(answer: str) -> str:
    """VQAv2's answer types: "yes/no", "number" or "other"."""
    text = normalise_answer(answer)
    return "yes/no" if text in ("yes", "no") else "number" if text.isdigit() else "other"


@dataclass
class Question:
    """One assistant turn of a chat sample: the conversation before it and its reference answers."""

    key: str
    turn: int
    messages: list[dict]  # ending with the user's question
    images: list[Image.Image]  # the images those messages show, in order
    answers: list[str]

    @property
    def question(self) -> str:
        content = self.messages[-1]["content"]
        return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def read_questions(shards: Sequence[str | Path], *, limit: int | None = None
                   ) -> tuple[list[Question], Counter, dict[str, str]]:
    """The questions of the chat samples of the shards (at most `limit`), skip counts and first
    errors; UserError naming the skips when there is none."""
    questions: list[Question] = []
    skipped: Counter = Counter()
    errors: dict[str, str] = {}
    for shard in shards:
        with open(shard, "rb") as stream:
            for raw in iter_shard_samples(stream, str(shard), max_member_bytes=64 * 2**20):
                questions += _sample_questions(raw, skipped, errors)
                if limit is not None and len(questions) >= limit:
                    return questions[:limit], skipped, errors
    if not questions:
        first = "".join(f"; first {reason}: {message}" for reason, message in errors.items())
        raise UserError(f"--task vqa: no chat samples with questions in {[str(s) for s in shards][:3]} "
                        f"(skipped: {dict(skipped)}{first}); make them with vlm data shapes --variants chat")
    return questions, skipped, errors


def _sample_questions(raw: dict, skipped: Counter, errors: dict[str, str]) -> list[Question]:
    try:
        if "__error__" in raw:
            raise raw["__error__"]
        sample = decode_sample(raw)
        if sample_kind(sample) != "chat":
            skipped[f"not a chat sample ({sample_kind(sample)})"] += 1
            return []
        images, messages = indexed_images(sample), sample["json"]["messages"]
        if count_images(messages) != len(images):
            raise SampleError(f"{sample['__key__']}: the messages show {count_images(messages)} image(s), the sample "
                              f"has {len(images)}", reason="image mismatch")
    except (SampleError, ValueError) as error:
        reason = getattr(error, "reason", "bad sample")
        skipped[reason] += 1
        errors.setdefault(reason, str(error))
        return []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and isinstance(m["content"], str)]
    return [Question(sample["__key__"], turn, messages[:i], images[:count_images(messages[:i])],
                     [messages[i]["content"].strip()]) for turn, i in enumerate(turns)]


def vqa_evaluate(captioner: Captioner, shards: Sequence[str | Path], *, limit: int | None = None,
                 batch_size: int = 32, max_new_tokens: int = 32, progress: bool = True,
                 search: Mapping[str, Any] | None = None) -> dict:
    """Answer every question of the chat shards (at most `limit`) and score; returns the report."""
    search = dict(search or {})
    questions, skipped, errors = read_questions(shards, limit=limit)
    start = time.perf_counter()
    predictions: list[str] = []
    for first in tqdm(range(0, len(questions), batch_size), unit="batch", desc="answering", disable=not progress):
        predictions += answer(captioner, questions[first:first + batch_size], max_new_tokens=max_new_tokens, **search)
    seconds = time.perf_counter() - start
    samples = [{"key": q.key, "turn": q.turn, "question": q.question, "prediction": p, "answers": q.answers,
                "accuracy": vqa_accuracy(p, q.answers)} for q, p in zip(questions, predictions)]
    return {"task": "vqa", "metrics": vqa_metrics(predictions, [q.answers for q in questions]),
            "questions": len(questions), "skipped": dict(skipped), "first_errors": errors,
            "seconds": round(seconds, 2), "settings": {"limit": limit, "batch_size": batch_size,
                                                       "max_new_tokens": max_new_tokens, **search},
            "samples": samples}


def answer(captioner: Captioner, questions: Sequence[Question], *, max_new_tokens: int, **search: Any) -> list[str]:
    """The model's answer to each question (greedy unless `search` says otherwise), stripped."""
    tokenizer = captioner.tokenizer
    prompts = [captioner.template.render(q.messages, add_generation_prompt=True)[0] for q in questions]
    images = [[captioner.transform(image) for image in q.images] for q in questions]
    outputs = captioner.model.generate(images, prompts, max_new_tokens=max_new_tokens, stop_tokens=captioner.stop_tokens,
                                       pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size, **search)
    return [tokenizer.decode(tokens).strip() for tokens in outputs]


def vqa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Mean VQA accuracy, exact match before normalisation, accuracy and count per answer type."""
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)]
    by_type: dict[str, list[float]] = defaultdict(list)
    for score, refs in zip(scores, answers):
        by_type[answer_type(refs[0])].append(score)
    exact = [p.strip() in {a.strip() for a in refs} for p, refs in zip(predictions, answers)]
    return {"vqa_accuracy": sum(scores) / len(scores), "exact_match": sum(exact) / len(exact),
            "by_answer_type": {kind: {"accuracy": sum(v) / len(v), "questions": len(v)}
                               for kind, v in sorted(by_type.items())}}


def check_vqa_options(args: Any) -> None:
    """UserError when an option of `vlm evaluate` that only captioning uses is given with --task vqa."""
    used = [flag for flag, value in (("--baselines", args.baselines), ("--shots", getattr(args, "shots", None)),
                                     ("--retrieve", getattr(args, "retrieve", None)), ("--features", args.features))
            if value]
    if used:
        raise UserError(f"--task vqa answers the questions of chat shards; {', '.join(used)} belong(s) to captioning "
                        "(--task caption)")


def finish_vqa(report: dict, out: str | Path) -> int:
    """Write `out/report.json`, print the skips and the accuracies; exit code 0."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for reason, message in report["first_errors"].items():
        print(f"vlm evaluate: skipped {report['skipped'][reason]} sample(s), the first: {message}", file=sys.stderr)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    metrics = report["metrics"]
    kinds = ", ".join(f"{kind} {v['accuracy']:.3f} ({v['questions']})" for kind, v in metrics["by_answer_type"].items())
    print(f"{report['questions']} questions: VQA accuracy {metrics['vqa_accuracy']:.3f} ({kinds}); exact match before "
          f"normalisation {metrics['exact_match']:.3f}")
    print(f"report: {out / 'report.json'}")
    return 0
