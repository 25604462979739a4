"""Tokenizer: exact round trips, special-token text stays text, save/load, Llama-3-like files, CLI."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from vlm.text import SPECIAL_TOKENS, Tokenizer
from vlm.text.tokenizer import main

ROUND_TRIP_TEXTS = [
    "plain ASCII sentence.",
    "Съешь же ещё этих булок",
    "敏捷的棕色狐狸",
    "한국어는 말뭉치에 없습니다",  # Hangul never appears in the corpus: byte fallback must cover it
    "emoji 🙂🚀 family 👩‍👩‍👧 flag 🇫🇷",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n  \n\t\t",
    "",
    " ",
    "\x00 control \x7f and combining e\u0301",
    "1234567890 digits 3.14159",
]
SPECIAL_TEXT = "<|eot_id|> <|image|><|begin_of_text|>x<|pad|>\n<|start_header_id|>user<|end_header_id|>"

LLAMA_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_training_merges_and_keeps_all_bytes(tokenizer: Tokenizer) -> None:
    assert 256 + len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 600
    text = "The quick brown fox"
    assert len(tokenizer.encode(text)) < len(text.encode())  # merges were learned
    assert tokenizer.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}


def test_named_ids(tokenizer: Tokenizer) -> None:
    named = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.eot_id, tokenizer.pad_id, tokenizer.image_id]
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>", "<|image|>"]
    assert named == [tokenizer.special_id(t) for t in tokens]
    assert len(set(named)) == len(named)
    assert tokenizer.decode([tokenizer.image_id], skip_special_tokens=False) == "<|image|>"
    assert tokenizer.decode([tokenizer.image_id, tokenizer.eot_id]) == ""


def test_special_token_text_is_plain_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(SPECIAL_TEXT)
    assert not set(ids) & set(tokenizer.special_tokens.values())
    assert tokenizer.decode(ids) == SPECIAL_TEXT
    assert tokenizer.decode(ids, skip_special_tokens=False) == SPECIAL_TEXT


def test_pickled_copy_keeps_special_text_plain(tokenizer: Tokenizer) -> None:
    # DataLoader workers receive pickled copies; `tokenizers` does not pickle the flag we rely on.
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(SPECIAL_TEXT) == tokenizer.encode(SPECIAL_TEXT)
    assert tokenizer.eot_id not in clone.encode("<|eot_id|>")


def test_save_and_from_file_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.from_file(path)
    assert Tokenizer.from_file(path.parent).vocab_size == loaded.vocab_size  # a directory works too
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.special_tokens == tokenizer.special_tokens
    for text in [*ROUND_TRIP_TEXTS, SPECIAL_TEXT]:
        assert loaded.encode(text) == tokenizer.encode(text)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        tokenizer.save(tmp_path)


def _llama_like_file(path: Path, corpus_file: Path, specials: list[str]) -> Path:
    """A tokenizer.json laid out like Llama 3's: specials after the BPE vocab, BOS post-processor."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train([str(corpus_file)], trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    backend.save(str(path))
    return path


def test_from_file_llama_like(corpus_file: Path, tmp_path: Path) -> None:
    path = _llama_like_file(tmp_path / "tokenizer.json", corpus_file, LLAMA_SPECIALS)
    base = tokenizers.Tokenizer.from_file(str(path)).get_vocab_size()
    tok = Tokenizer.from_file(path)
    assert tok.vocab_size == base + 1  # <|image|> appended as a new id
    assert tok.image_id == base
    assert tok.bos_id == 400 and tok.eot_id == 409
    assert tok.pad_id == tok.special_id("<|finetune_right_pad_id|>")
    assert tok.encode("hi") == tokenizers.Tokenizer.from_file(str(path)).encode("hi", add_special_tokens=False).ids
    ids = tok.encode("<|python_tag|><|eot_id|><|image|>")  # no BOS, no specials from text
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "<|python_tag|><|eot_id|><|image|>"
    with pytest.raises(KeyError, match=re.escape("'<|pad|>' is not a special token")):
        tok.special_id("<|pad|>")


def test_from_file_pad_fallbacks(corpus_file: Path, tmp_path: Path) -> None:
    llama30 = [t for t in LLAMA_SPECIALS if t != "<|finetune_right_pad_id|>"]
    tok = Tokenizer.from_file(_llama_like_file(tmp_path / "a.json", corpus_file, llama30))
    assert tok.pad_id == tok.eot_id
    tok = Tokenizer.from_file(
        _llama_like_file(tmp_path / "b.json", corpus_file, llama30), extra_special_tokens=["<|image|>", "<|pad|>"]
    )
    assert tok.pad_id == tok.special_id("<|pad|>") == tok.vocab_size - 1


def test_from_file_errors(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    no_eot = _llama_like_file(tmp_path / "no_eot.json", corpus_file, [t for t in LLAMA_SPECIALS if t != "<|eot_id|>"])
    with pytest.raises(ValueError, match=r"no_eot.json lacks the special tokens \['<\|eot_id\|>'\]"):
        Tokenizer.from_file(no_eot)
    assert Tokenizer.from_file(no_eot, extra_special_tokens=["<|image|>", "<|eot_id|>"]).eot_id > 400


def test_train_errors(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train([corpus_file, tmp_path / "nope.txt"], 600)
    with pytest.raises(ValueError, match="no training files"):
        Tokenizer.train([], 600)
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 263"):
        Tokenizer.train([corpus_file], 262)
    with pytest.raises(ValueError, match=r"must include \['<\|image\|>'\]"):
        Tokenizer.train([corpus_file], 600, special_tokens=[t for t in SPECIAL_TOKENS if t != "<|image|>"])
    with pytest.raises(ValueError, match="more than once"):
        Tokenizer.train([corpus_file], 600, special_tokens=[*SPECIAL_TOKENS, "<|pad|>"])


def test_smallest_vocab_still_round_trips(corpus_file: Path) -> None:
    tok = Tokenizer.train(str(corpus_file), 263, show_progress=False)
    assert tok.vocab_size == 263
    assert tok.decode(tok.encode(ROUND_TRIP_TEXTS[4])) == ROUND_TRIP_TEXTS[4]


def test_decode_rejects_unknown_ids(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([1, tokenizer.vocab_size])
    with pytest.raises(ValueError, match=r"\[-100\]"):
        tokenizer.decode([-100])
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_cli_trains_and_writes(corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tok" / "tokenizer.json"
    code = main(["train", "--files", str(corpus_file), "--vocab-size", "500", "--out", str(out),
                 "--special-tokens", "<|extra|>", "--quiet"])
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    tok = Tokenizer.from_file(out)
    assert f"vocab size {tok.vocab_size}" in summary and str(out) in summary
    assert tok.special_id("<|extra|>") == len(SPECIAL_TOKENS)
    assert json.loads(out.read_text())["model"]["type"] == "BPE"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--files", "missing.txt", "--vocab-size", "500", "--out", "x.json"], "missing.txt"),
        (["train", "--files", "CORPUS", "--vocab-size", "100", "--out", "x.json"], "vocab_size must be"),
        (["train", "--files", "CORPUS", "--vocab-size", "500", "--out", "TMP"], "is a directory"),
        (["train", "--files", "CORPUS", "--vocab-size", "lots", "--out", "x.json"], "invalid int value"),
        ([], "required"),
    ],
)
def test_cli_bad_input_exits_2(
    args: list[str], message: str, corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(corpus_file) if a == "CORPUS" else str(tmp_path) if a == "TMP" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
