"""Byte-level BPE tokenizer: train one on text files, or load a `tokenizer.json` such as Llama 3's.

A thin wrapper over Hugging Face `tokenizers` with one promise the library does not make by
default: `encode` treats text that spells a special token ("<|eot_id|>", "<|image|>") as plain
text. Special tokens reach a sequence only through their ids (the chat template inserts them), so
user data can never forge a turn boundary or an image slot.

CLI: `vlm tokenizer train --files F [F ...] --vocab-size N --out PATH [--special-tokens ...]`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
IMAGE, PAD = "<|image|>", "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, START_HEADER, END_HEADER, EOT, IMAGE, PAD)
# Without these the chat template cannot lay out a conversation.
_CORE_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT)
# Llama 3.1+ ships a dedicated padding token; Llama 3.0 does not, so we fall back to <|eot_id|>.
_PAD_FALLBACKS = (PAD, "<|finetune_right_pad_id|>", EOT)

# Llama 3's pre-tokenization split (digits in groups of at most three, contractions, whitespace
# runs), so a tokenizer trained here segments text the way the backbone's own tokenizer does.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_ALPHABET_SIZE = 256


class Tokenizer:
    """A byte-level BPE tokenizer with named special tokens.

    Args:
        backend: the `tokenizers.Tokenizer` to wrap; it is switched to treat special-token text
            as plain text.
        pad_token: which special token pads batches (`<|pad|>`, or a fallback for Llama files).
        source: where the tokenizer came from, used in error messages.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, pad_token: str = PAD, source: str = "<memory>"):
        self._backend = backend
        self._backend.encode_special_tokens = True
        self._source = source
        self._pad_token = pad_token
        added = backend.get_added_tokens_decoder()
        self._special_ids = {tok.content: idx for idx, tok in added.items() if tok.special}
        # max id + 1, not a count: embedding tables must cover every id even if ids have gaps.
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def __setstate__(self, state: dict) -> None:
        # The `encode_special_tokens` flag is not pickled by `tokenizers`; a DataLoader worker
        # would otherwise turn "<|eot_id|>" in user text back into a real turn boundary.
        self.__dict__.update(state)
        self._backend.encode_special_tokens = True

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self._source!r})"

    @classmethod
    def train(
        cls,
        files: Sequence[str | Path] | str | Path,
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
        min_frequency: int = 2,
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train a byte-level BPE on UTF-8 text files.

        The 256 byte symbols are always in the vocabulary, so any string encodes and decodes back
        exactly. Special tokens take the first ids, in the order given; they must include all of
        `SPECIAL_TOKENS`. The result may be smaller than `vocab_size` if the corpus runs out of
        pairs seen `min_frequency` times.
        """
        paths = _check_files([files] if isinstance(files, (str, Path)) else files)
        special_tokens = _check_special_tokens(special_tokens)
        smallest = _BYTE_ALPHABET_SIZE + len(special_tokens)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
            raise ValueError(
                f"vocab_size must be an integer >= {smallest} (256 byte symbols + "
                f"{len(special_tokens)} special tokens), got {vocab_size!r}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train([str(p) for p in paths], trainer)
        return cls(backend, pad_token=PAD, source=f"trained on {len(paths)} file(s)")

    @classmethod
    def from_file(cls, path: str | Path, *, extra_special_tokens: Sequence[str] = (IMAGE,)) -> Tokenizer:
        """Load a `tokenizer.json` (or a directory holding one), e.g. Llama 3's.

        `extra_special_tokens` absent from the file are appended as new special tokens (new ids at
        the end, so a pretrained embedding table must grow to `vocab_size`). By default only
        `<|image|>` is added: Llama 3.2 Vision already has it, Llama 3/3.1 text models do not.
        The pad token is `<|pad|>` if present, else `<|finetune_right_pad_id|>` (Llama 3.1+), else
        `<|eot_id|>`; padded positions are masked by the attention mask and labels either way.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception for bad JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error
        present = {tok.content for tok in backend.get_added_tokens_decoder().values() if tok.special}
        missing = [t for t in dict.fromkeys(extra_special_tokens) if t not in present]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        present.update(missing)
        lacking = [t for t in _CORE_TOKENS if t not in present]
        if lacking:
            raise ValueError(
                f"{path} lacks the special tokens {lacking} that the chat template needs; "
                "pass them in extra_special_tokens to add them"
            )
        pad_token = next(t for t in _PAD_FALLBACKS if t in present)
        return cls(backend, pad_token=pad_token, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as a standard `tokenizer.json`, creating parent directories."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; give a file path such as {path / 'tokenizer.json'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token spellings stay plain text and no BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, or a 1-D tensor); ids outside the vocabulary are an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self._vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def special_id(self, token: str) -> int:
        """Id of the special token `token`; KeyError naming the known ones if it is absent."""
        if token not in self._special_ids:
            raise KeyError(
                f"{token!r} is not a special token of the tokenizer ({self._source}); "
                f"known: {sorted(self._special_ids)[:12]}"
            )
        return self._special_ids[token]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self.special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.special_id(EOS)

    @property
    def eot_id(self) -> int:
        return self.special_id(EOT)

    @property
    def pad_id(self) -> int:
        return self.special_id(self._pad_token)

    @property
    def image_id(self) -> int:
        return self.special_id(IMAGE)


def _check_files(files: Iterable[str | Path]) -> list[Path]:
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no training files given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"training file {path} does not exist or is not a file")
    return paths


def _check_special_tokens(special_tokens: Sequence[str]) -> list[str]:
    tokens = list(special_tokens)
    if any(not isinstance(t, str) or not t for t in tokens):
        raise ValueError(f"special tokens must be non-empty strings, got {tokens}")
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise ValueError(f"special tokens {duplicates} are given more than once")
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise ValueError(f"special tokens must include {missing}: the chat template and collator use them")
    return tokens


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm tokenizer", description="Byte-level BPE tokenizers.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE on text files")
    train.add_argument("--files", nargs="+", required=True, help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True, help="target size, specials included")
    train.add_argument("--out", required=True, help="where to write tokenizer.json")
    train.add_argument("--special-tokens", nargs="*", default=[],
                       help=f"extra special tokens, appended after the standard {len(SPECIAL_TOKENS)}")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merge")
    train.add_argument("--quiet", action="store_true", help="hide the training progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`vlm tokenizer train ...`; returns 0 on success, 2 on bad input."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return stop.code if isinstance(stop.code, int) else 2
    out = Path(args.out)
    try:
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a directory; give a file path such as {out / 'tokenizer.json'}")
        tokenizer = Tokenizer.train(
            args.files,
            args.vocab_size,
            special_tokens=[*SPECIAL_TOKENS, *args.special_tokens],
            min_frequency=args.min_frequency,
            show_progress=not args.quiet,
        )
        tokenizer.save(out)
    except (OSError, ValueError) as error:
        print(f"vlm tokenizer train: error: {error}", file=sys.stderr)
        return 2
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus yielded {tokenizer.vocab_size} of the {args.vocab_size} tokens asked for "
              f"(no pair left with count >= {args.min_frequency})")
    print(f"trained byte-level BPE: vocab size {tokenizer.vocab_size} "
          f"({len(tokenizer.special_tokens)} special tokens) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
