"""Passkey training text: the prompts `vlm evaluate-context` scores, as interleaved (text-only) shards.

    vlm data passkey --out data/passkey --train 20000 --val 200 --max-length 256

Each document is one prompt of the evaluation's protocol (`vlm.eval.context.passkey_sample`: the
instruction, filler sentences with a 5-digit key stated at a random depth, the question) followed by
its answer, of a random length in [--min-length, --max-length] tokens counting <|begin_of_text|> and
<|end_of_text|>. Keys and depths come from `random.Random("passkey-data/{seed}/{split}/{index}")`,
a stream the evaluation (`"passkey/{seed}/{length}"`) never draws from, so training never sees the
held-out samples themselves; the same arguments always write the same shards.

The tokenizer (`tokenizer.json`, trained first unless `--tokenizer` names one) is a byte-level BPE
trained on the protocol's sentences without any digits, so every digit stays one token and a
document's text encodes to exactly the pieces the evaluation concatenates. `held_out.txt` holds
documents drawn from the "held-out" split, for `vlm evaluate-context --text`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from vlm.data.writer import ShardWriter
from vlm.errors import UserError
from vlm.eval.context import FILLER, INSTRUCTION, QUESTION, passkey_sample
from vlm.text.tokenizer import Tokenizer

KEY_WORDS = " The pass key is . Remember it. is the pass key."  # the key sentence without its digits
DOCUMENT_OVERHEAD = 2  # <|begin_of_text|> is part of the prompt; <|end_of_text|> follows the answer


def train_tokenizer(out: str | Path, *, vocab_size: int = 512) -> Tokenizer:
    """A BPE over the protocol's sentences (no digits, so none is merged), saved to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = out.with_suffix(".corpus.txt")
    lines = [INSTRUCTION, QUESTION, KEY_WORDS, *FILLER, "".join(FILLER)]
    corpus.write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
    tokenizer = Tokenizer.train([corpus], vocab_size, show_progress=False)
    tokenizer.save(out)
    return tokenizer


def passkey_document(tokenizer: Tokenizer, rng: random.Random, *, min_length: int, max_length: int) -> dict:
    """One interleaved sample: json {"segments": [the prompt and answer as text], "passkey", "depth"}."""
    length = rng.randint(min_length, max_length) - DOCUMENT_OVERHEAD + 1  # + 1: the prompt's own BOS
    sample = passkey_sample(tokenizer, length, rng.random(), rng)
    text = tokenizer.decode(sample.ids)  # the BOS dropped: the interleaved format adds it
    return {"json": {"segments": [{"type": "text", "text": text}], "passkey": sample.passkey,
                     "depth": sample.depth}}


def document_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"passkey-data/{seed}/{split}/{index}")


def make_passkey_dataset(out: str | Path, *, train: int, val: int, seed: int = 0, min_length: int = 96,
                         max_length: int = 256, held_out: int = 16, tokenizer: str | Path | None = None,
                         shard_size: int = 5000, shard_bytes: int = 1 << 30, overwrite: bool = False) -> dict:
    """Write `out/{train,val}-*.tar`, `out/held_out.txt` (`held_out` documents of `max_length`
    tokens), `out/tokenizer.json` (unless `tokenizer` is given) and `out/manifest.json`."""
    if not 0 < min_length <= max_length or train < 0 or val < 0:
        raise ValueError(f"passkey data needs 0 < min_length <= max_length and counts >= 0, got "
                         f"min_length={min_length} max_length={max_length} train={train} val={val}")
    out = Path(out)
    writers = {split: ShardWriter(out, prefix=split, max_count=shard_size, max_bytes=shard_bytes, overwrite=overwrite)
               for split in ("train", "val")}
    tok = Tokenizer.from_file(tokenizer) if tokenizer else train_tokenizer(out / "tokenizer.json")
    try:
        passkey_sample(tok, min_length - DOCUMENT_OVERHEAD + 1, 0.0, random.Random(0))
    except UserError:
        raise ValueError(f"--min-length {min_length} is shorter than the passkey prompt with this tokenizer") from None
    for (split, writer), count in zip(writers.items(), (train, val)):
        with writer:
            for index in range(count):
                document = passkey_document(tok, document_rng(seed, split, index), min_length=min_length,
                                            max_length=max_length)
                writer.write({"__key__": f"{split}-{index:07d}", **document})
    texts = [passkey_document(tok, document_rng(seed, "held-out", index), min_length=max_length,
                              max_length=max_length)["json"]["segments"][0]["text"] for index in range(held_out)]
    (out / "held_out.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    manifest = {"dataset": "vlm-passkey", "version": 1, "seed": seed, "splits": {"train": train, "val": val},
                "min_length": min_length, "max_length": max_length, "held_out": held_out,
                "tokenizer": str(tokenizer or out / "tokenizer.json"), "vocab_size": tok.vocab_size}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vlm data passkey` (the shard options come from vlm.data.cli)."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=20_000, help="training documents")
    parser.add_argument("--val", type=int, default=256, help="validation documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-length", type=int, default=96, help="shortest document in tokens")
    parser.add_argument("--max-length", type=int, default=256, help="longest document in tokens")
    parser.add_argument("--held-out", type=int, default=16, help="documents of --max-length in held_out.txt")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="an existing tokenizer.json to size documents with (default: train one into --out)")


def run(args: argparse.Namespace) -> int:
    manifest = make_passkey_dataset(args.out, train=args.train, val=args.val, seed=args.seed,
                                    min_length=args.min_length, max_length=args.max_length, held_out=args.held_out,
                                    tokenizer=args.tokenizer, shard_size=args.shard_size,
                                    shard_bytes=args.shard_bytes, overwrite=args.overwrite)
    print(f"passkey: {args.train} train, {args.val} val documents of {args.min_length}-{args.max_length} tokens, "
          f"{args.held_out} held out, tokenizer {manifest['tokenizer']} ({manifest['vocab_size']} tokens) "
          f"-> {args.out}/train-*.tar")
    return 0
