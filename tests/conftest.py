import os

# Any accidental hub look-up fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402

CORPUS = "a red circle on a white background\na small blue square next to a green triangle\n" * 40


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer (special tokens first, so <|image|> is id 5)."""
    from vlm.text.tokenizer import Tokenizer

    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(CORPUS)
    return Tokenizer.train([corpus], 300, show_progress=False)
