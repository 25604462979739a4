"""A tiny shapes set and tokenizer, shared by the training tests."""

from pathlib import Path

import pytest

from vlm.data.corpus import write_corpus
from vlm.data.shapes import make_shapes_dataset
from vlm.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=160, val=32, seed=0, workers=0, shard_size=40)
    write_corpus(sorted((out / "caption").glob("train-*.tar")), out / "corpus.txt")
    Tokenizer.train([out / "corpus.txt"], 320, show_progress=False).save(out / "tokenizer.json")
    return out

