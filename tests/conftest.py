import os

# Any accidental hub look-up fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the two cores: one thread each (torch's two
    # threads per worker would oversubscribe them), for the subprocesses they start too.
    os.environ["OMP_NUM_THREADS"] = "1"


import pytest  # noqa: E402

CORPUS = "a red circle on a white background\na small blue square next to a green triangle\n" * 40


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer (special tokens first, so <|image|> is id 5)."""
    from vlm.text.tokenizer import Tokenizer

    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(CORPUS)
    return Tokenizer.train([corpus], 300, show_progress=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """The tiny LLaVA model (tests/tiny_models.py) exported with the session tokenizer: a `--model`
    directory for the commands (shared: tests write their reports elsewhere, with --out)."""
    from tiny_models import tiny_model_for

    from vlm.export import save_model

    path = tmp_path_factory.mktemp("model") / "llava"
    save_model(tiny_model_for(tokenizer), path, tokenizer=tokenizer)
    return path
