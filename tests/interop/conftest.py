"""The interoperability tests' tokenizer: a small byte-level BPE trained on caption-like text."""

from __future__ import annotations

import pytest

from vlm.text.tokenizer import Tokenizer

CORPUS = "\n".join([
    "A photo of a red circle next to a blue square on a white background.",
    "What color is the circle? The circle is red. How many shapes are there? Two shapes.",
    "Describe the image in one sentence, please. A green triangle above a yellow star.",
] * 6) + "\n"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(CORPUS)
    return Tokenizer.train([corpus], 330, show_progress=False, min_frequency=1)

