"""Long-context evaluation: passkey retrieval and perplexity against length.

    vlm evaluate-context --model D --lengths 256 512 1024 2048 --text held_out.txt

Passkey (the protocol of the Position Interpolation and Landmark Attention papers): a random
5-digit number is stated once inside repeated filler sentences, at several depths (0 = right
after the instruction, 1 = just before the question), and the model must complete "The pass key
is" with it. The prompt pieces are tokenized separately and concatenated, so the answer's tokens
are exactly those stated in the text. A sample counts as retrieved when the model's greedy choice
is right at every answer token (teacher-forced argmax: the same as greedy decoding of that many
tokens whenever it is right); `digit_accuracy` compares the decoded choices digit by digit
(chance 1/10, exact chance 10^-5).

Perplexity: the held-out text (a text file, or the captions of caption shards) tokenized as one
stream and cut into non-overlapping windows of each length; exp of the mean next-token loss.
With a tokenizer that has <|begin_of_text|> (every tokenizer vlm trains), passkey prompts and
perplexity windows start with it, as every training sample does.

`--rope-scaling '{"type": "yarn", "factor": 8, "original_max_position_embeddings": 256}'`
evaluates the model with another RoPE scaling and no fine-tuning. Writes context.json and
context.png (passkey accuracy and perplexity against length) to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from vlm.errors import UserError

Logits = Callable[[torch.Tensor], torch.Tensor]  # ids [1, T] -> logits [1, T, vocab]

INSTRUCTION = ("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it: "
               "you will be asked for it at the end.")
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")
QUESTION = " What is the pass key? The pass key is "
DIGITS = 5
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class PasskeySample:
    ids: list[int]  # the whole row: prompt then answer
    answer_start: int  # ids[answer_start:] is the answer
    passkey: str
    depth: float


def passkey_samples(tokenizer: TextTokenizer, length: int, *, depths: Sequence[float] = DEPTHS, trials: int = 2,
                    seed: int = 0) -> list[PasskeySample]:
    """`trials` samples per depth of at most `length` tokens; the same arguments give the same samples."""
    rng = random.Random(f"passkey/{seed}/{length}")
    return [passkey_sample(tokenizer, length, depth, rng) for depth in depths for _ in range(trials)]


def passkey_sample(tokenizer: TextTokenizer, length: int, depth: float, rng: random.Random) -> PasskeySample:
    """One prompt of at most `length` tokens (a <|begin_of_text|> first when the tokenizer has one)
    with a key drawn from `rng` at `depth`, then its answer. `vlm.data.passkey` trains on these."""
    passkey = "".join(rng.choice("0123456789") for _ in range(DIGITS))
    head, question = bos_ids(tokenizer) + tokenizer.encode(INSTRUCTION), tokenizer.encode(QUESTION)
    answer = tokenizer.encode(passkey)
    key = tokenizer.encode(" The pass key is ") + answer
    key += tokenizer.encode(f". Remember it. {passkey} is the pass key.")
    room = length - len(head) - len(key) - len(question) - len(answer)
    if room < 0:
        raise UserError(f"length {length} is too short for the passkey prompt ({length - room} tokens)")
    filler = _filler([tokenizer.encode(sentence) for sentence in FILLER], room)
    before = round(depth * len(filler))  # the key goes between two whole sentences
    prompt = head + sum(filler[:before], []) + key + sum(filler[before:], []) + question
    return PasskeySample(prompt + answer, len(prompt), passkey, depth)


def bos_ids(tokenizer: TextTokenizer) -> list[int]:
    """[<|begin_of_text|>] for a tokenizer that has it (models trained by vlm always saw it first), else []."""
    try:
        return [tokenizer.bos_id]  # type: ignore[attr-defined]
    except (AttributeError, KeyError):
        return []


def _filler(sentences: list[list[int]], room: int) -> list[list[int]]:
    """The filler sentences, in turn, as many as fit in `room` tokens."""
    filler: list[list[int]] = []
    while room >= len(sentences[len(filler) % len(sentences)]):
        filler.append(sentences[len(filler) % len(sentences)])
        room -= len(filler[-1])
    return filler


def score_passkey(logits_fn: Logits, tokenizer: TextTokenizer, samples: Sequence[PasskeySample]) -> dict:
    """Exact accuracy, digit accuracy and accuracy per depth of the model's greedy answers."""
    exact, digits, by_depth = [], [], {}
    for sample in samples:
        ids = torch.tensor([sample.ids])
        logits = logits_fn(ids)[0, sample.answer_start - 1 : -1]  # the positions that predict the answer
        chosen = logits.argmax(-1).tolist()
        right = chosen == sample.ids[sample.answer_start :]
        text = tokenizer.decode(chosen)
        exact.append(float(right))
        digits.append(sum(a == b for a, b in zip(text, sample.passkey)) / len(sample.passkey))
        by_depth.setdefault(f"{sample.depth:g}", []).append(float(right))
    return {
        "accuracy": _mean(exact),
        "stderr": math.sqrt(_mean(exact) * (1 - _mean(exact)) / len(exact)),
        "digit_accuracy": _mean(digits),
        "by_depth": {depth: _mean(values) for depth, values in by_depth.items()},
        "samples": len(samples),
        "mean_length": _mean([len(s.ids) for s in samples]),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def perplexity(logits_fn: Logits, tokens: Sequence[int], length: int, *, windows: int = 4,
               bos: Sequence[int] = ()) -> dict:
    """exp(mean next-token loss) over up to `windows` non-overlapping windows of `length` tokens
    (`bos` then the text's next `length - len(bos)` tokens)."""
    span = length - len(bos)
    available = len(tokens) // span if span > 0 else 0
    if available == 0:
        raise UserError(f"the held-out text has {len(tokens)} tokens, fewer than one window of {length}: "
                        "give a longer --text file or more --shards")
    total, count = 0.0, 0
    for w in range(min(windows, available)):
        ids = torch.tensor([list(bos) + list(tokens[w * span : (w + 1) * span])])
        logits = logits_fn(ids)[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += length - 1
    return {"perplexity": math.exp(total / count), "nll": total / count, "windows": min(windows, available),
            "tokens": count}


def evaluate_context(logits_fn: Logits, tokenizer: TextTokenizer, held_out: Sequence[int], lengths: Sequence[int], *,
                     depths: Sequence[float] = DEPTHS, trials: int = 2, windows: int = 4, seed: int = 0) -> dict:
    """Passkey retrieval and perplexity at each length."""
    report = {"lengths": list(lengths), "chance": {"accuracy": 10.0**-DIGITS, "digit_accuracy": 0.1},
              "passkey": {}, "perplexity": {}}
    for length in lengths:
        samples = passkey_samples(tokenizer, length, depths=depths, trials=trials, seed=seed)
        report["passkey"][str(length)] = score_passkey(logits_fn, tokenizer, samples)
        report["perplexity"][str(length)] = perplexity(logits_fn, held_out, length, windows=windows,
                                                        bos=bos_ids(tokenizer))
    return report


def held_out_tokens(tokenizer: TextTokenizer, *, text: str | Path | None = None,
                    shards: Sequence[str | Path] = ()) -> list[int]:
    """The tokens of a text file, or of the captions of caption shards (one per line)."""
    if text is not None:
        return tokenizer.encode(Path(text).read_text(encoding="utf-8"))
    from vlm.data.examples import caption_examples
    from vlm.data.pipeline import expand_shards

    captions = [ref for example in caption_examples(expand_shards(list(shards))) for ref in example.references]
    if not captions:
        raise UserError(f"no caption samples in {list(shards)}")
    return tokenizer.encode("\n".join(captions))


# --- command line ------------------------------------------------------------------------------


def load_text_model(path: str | Path, *, rope_scaling: dict | None = None, device: str | None = None):
    """The text backbone and tokenizer of a `vlm export` directory (or a Llama directory with a
    tokenizer.json), with `rope_scaling` replacing the model's own when given."""
    from vlm.checkpoints import load_llama
    from vlm.checkpoints.common import load_state_exact
    from vlm.export import TEXT_DIR, load_tokenizer
    from vlm.text.llama import Llama
    from vlm.text.rope import rope_scaling_from_dict

    path = Path(path)
    model = load_llama(path / TEXT_DIR if (path / TEXT_DIR).is_dir() else path, device=device).eval()
    tokenizer = load_tokenizer(path)
    if rope_scaling is not None:
        config = dataclasses.replace(model.config, rope_scaling=rope_scaling_from_dict(rope_scaling))
        with torch.device("meta"):
            rescaled = Llama(config)
        load_state_exact(rescaled, model.state_dict(), source=str(path))
        model = rescaled.eval()
    return model, tokenizer


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """context.json and context.png (passkey accuracy +- its standard error, perplexity; against
    length) in `out`."""
    from vlm.eval.plot import Series, line_chart

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [str(length) for length in report["lengths"]]
    passkey = Series("passkey", [report["passkey"][k]["accuracy"] for k in keys],
                     [report["passkey"][k]["stderr"] for k in keys])
    ppl = Series("perplexity", [report["perplexity"][k]["perplexity"] for k in keys], [0.0] * len(keys))
    chart = line_chart([("passkey retrieval accuracy", [passkey]), ("perplexity", [ppl])], report["lengths"],
                       x_label="context length (tokens)")
    json_file, png_file = out / "context.json", out / "context.png"
    json_file.write_text(json.dumps(report, indent=2) + "\n")
    chart.save(png_file)
    return json_file, png_file


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm evaluate-context", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a directory written by `vlm export`")
    parser.add_argument("--lengths", type=int, nargs="+", required=True, help="context lengths in tokens")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="held-out text file for perplexity")
    source.add_argument("--shards", nargs="+", help="caption shards whose captions are the held-out text")
    parser.add_argument("--out", default=None, help="report folder (default: MODEL/context)")
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS), help="passkey depths in [0, 1]")
    parser.add_argument("--trials", type=int, default=2, help="passkey samples per depth and length")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows per length")
    parser.add_argument("--seed", type=int, default=0, help="passkey generator seed")
    parser.add_argument("--rope-scaling", default=None, metavar="JSON",
                        help='replace the model\'s RoPE scaling, e.g. \'{"type": "linear", "factor": 8}\'')
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    return parser


def _parse_rope(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--rope-scaling is not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise UserError(f'--rope-scaling must be a JSON object like {{"type": "linear", "factor": 4}}, got {text!r}')
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if any(not 0 <= d <= 1 for d in args.depths) or min(args.lengths) <= 0 or args.trials <= 0 or args.windows <= 0:
        raise UserError("--depths must lie in [0, 1]; --lengths, --trials and --windows must be positive")
    model, tokenizer = load_text_model(args.model, rope_scaling=_parse_rope(args.rope_scaling), device=args.device)
    held_out = held_out_tokens(tokenizer, text=args.text, shards=args.shards or ())
    device = model.tok_embeddings.weight.device

    vocab = min(tokenizer.vocab_size, model.config.vocab_size)  # a model's rows past the tokenizer's are no token

    @torch.inference_mode()
    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(device))[..., :vocab].float().cpu()

    report = evaluate_context(logits_fn, tokenizer, held_out, args.lengths, depths=args.depths, trials=args.trials,
                              windows=args.windows, seed=args.seed)
    report |= {"model": str(args.model), "rope_scaling": _scaling_dict(model.config.rope_scaling)}
    json_file, png_file = write_report(report, args.out or Path(args.model) / "context")
    for length in args.lengths:
        key = str(length)
        print(f"length {length:>6}: passkey {100 * report['passkey'][key]['accuracy']:5.1f}%  "
              f"perplexity {report['perplexity'][key]['perplexity']:.3f}")
    print(f"wrote {json_file} and {png_file}")
    return 0


def _scaling_dict(scaling) -> dict | None:
    from vlm.text.rope import rope_scaling_to_dict

    return None if scaling is None else rope_scaling_to_dict(scaling)
