"""Shared fixtures for the text tests: a small multilingual corpus and a tokenizer trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm.text.tokenizer import Tokenizer

# A few KB of text in several scripts, with emoji, digits and whitespace runs: enough for merges.
_LINES = [
    "The quick brown fox jumps over the lazy dog while 42 cats watch.",
    "A photo of a red circle next to a blue square on a white background.",
    "Describe the image in one sentence, please.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "敏捷的棕色狐狸跳过了懒狗。图片里有一个红色的圆。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "الثعلب البني السريع يقفز فوق الكلب الكسول",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Emoji time 🙂🚀🎉 and flags 🇫🇷 with a family 👩‍👩‍👧 in between.",
    "    indented code: def f(x):\n        return x * 2\n",
    "Numbers 1234567890 and 3.14159 and 2024-06-01.",
]
CORPUS = "\n".join(_LINES * 8) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus_file: Path) -> Tokenizer:
    return Tokenizer.train([corpus_file], 600, show_progress=False)
