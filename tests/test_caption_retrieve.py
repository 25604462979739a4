"""Retrieval-augmented captioning: `Captioner.caption_retrieved`, `vlm caption --retrieve` and
`vlm evaluate --retrieve` (the retrieved entries in the prompt, most similar last; their keys as sources)."""

import json

import pytest
import torch
from tiny_models import tiny_model_for

from vlm.caption import Captioner
from vlm.cli import main
from vlm.data.examples import caption_examples
from vlm.data.shapes import make_shapes_dataset
from vlm.eval.baselines import embed_images
from vlm.export import load_model, save_model
from vlm.retrieval import Index, build_index


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=12, val=3, seed=3, workers=0, variants=["caption"])
    return out / "caption"



@pytest.fixture(scope="module")
def index_dir(shards, model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "index"
    build_index(load_model(model_dir), sorted(shards.glob("train-*.tar")), path, progress=False,
                source={"model": str(model_dir)})
    return path


@pytest.fixture(scope="module")
def train(shards):
    return list(caption_examples(sorted(shards.glob("train-*.tar"))))


def nearest_keys(model, train, image, k, *, skip=None):
    """Brute-force cosine top-k keys of the training images, best first."""
    vectors = embed_images(model, [e.image for e in train], progress=False)
    query = embed_images(model, [image], progress=False)[0]
    order = [i for i in torch.argsort(vectors @ query, descending=True).tolist() if train[i].key != skip]
    return [train[i].key for i in order[:k]]


class Recording(Captioner):
    def caption_fewshot(self, images, demonstrations, **kwargs):
        self.demonstrations = demonstrations
        return super().caption_fewshot(images, demonstrations, **kwargs)


@pytest.mark.parametrize("mode", ["pairs", "captions"])
def test_retrieved_entries_enter_the_prompt_most_similar_last(model_dir, index_dir, train, tokenizer, mode):
    model = load_model(model_dir)
    captioner = Recording(model, tokenizer)
    queries = [train[4].image, train[7].image]
    found = captioner.caption_retrieved(queries, Index.load(index_dir), k=3, mode=mode, max_new_tokens=3,
                                        exclude_keys=[train[4].key, None])
    assert [c.sources for c in found] == [tuple(nearest_keys(model, train, train[4].image, 3, skip=train[4].key)),
                                          tuple(nearest_keys(model, train, train[7].image, 3))]
    assert found[1].sources[0] == train[7].key  # not excluded: an image in the store finds itself first
    by_key = {e.key: e for e in train}
    for demos, captioned in zip(captioner.demonstrations, found):
        assert [d.key for d in demos] == list(captioned.sources[::-1])
        assert [d.caption for d in demos] == [by_key[d.key].references[0] for d in demos]
        if mode == "pairs":
            assert [d.image.tobytes() for d in demos] == [by_key[d.key].image.tobytes() for d in demos]
        else:
            assert all(d.image is None for d in demos)
    assert [c.text for c in found] == Captioner(model, tokenizer).caption_fewshot(
        queries, captioner.demonstrations, max_new_tokens=3)


def test_caption_cli_prints_sources(shards, model_dir, index_dir, train, tokenizer, tmp_path, capsys):
    """Also from a Flamingo model whose tower did not build the index: the index's own tower embeds the query."""
    query = next(caption_examples(sorted(shards.glob("val-*.tar"))))
    query.image.save(tmp_path / "query.png")
    expected = nearest_keys(load_model(model_dir), train, query.image, 2)
    save_model(tiny_model_for(tokenizer, "flamingo", seed=1), tmp_path / "flamingo", tokenizer=tokenizer)
    for model, mode in ((model_dir, "pairs"), (model_dir, "captions"), (tmp_path / "flamingo", "pairs")):
        assert main(["caption", "--model", str(model), "--retrieve", str(index_dir), "-k", "2",
                     "--retrieve-mode", mode, "--max-new-tokens", "3", str(tmp_path / "query.png")]) == 0
        path, _, sources = capsys.readouterr().out.rstrip("\n").split("\t")
        assert path == str(tmp_path / "query.png") and sources.split(",") == expected


def test_evaluate_retrieve_stores_sources_never_the_image_itself(shards, model_dir, index_dir, train, tmp_path):
    data = str(shards / "train-*.tar")  # the store's own images: each must not retrieve itself
    assert main(["evaluate", "--model", str(model_dir), "--data", data, "--limit", "4", "--retrieve", str(index_dir),
                 "-k", "2", "--retrieve-mode", "captions", "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["retrieve"] == {"index": str(index_dir), "k": 2, "mode": "captions"}
    model = load_model(model_dir)
    for sample, example in zip(report["samples"], train):
        assert sample["sources"] == nearest_keys(model, train, example.image, 2, skip=example.key)
    direct = Captioner.from_directory(model_dir).caption_retrieved(
        [e.image for e in train[:4]], Index.load(index_dir), k=2, mode="captions", max_new_tokens=3,
        exclude_keys=[e.key for e in train[:4]])
    assert [s["prediction"] for s in report["samples"]] == [c.text for c in direct]


@pytest.mark.parametrize("args, message", [
    (["-k", "2"], "-k and --retrieve-mode choose what --retrieve INDEX puts in the prompt"),
    (["--retrieve", "{index}", "--prompt", "what is it?"], "drop --prompt"),
    (["--retrieve", "{index}", "-k", "0"], "-k must be >= 1"),
    (["--retrieve", "{missing}"], "is not a vlm index"),
])
def test_caption_cli_bad_options_are_one_line(model_dir, index_dir, tmp_path, capsys, args, message):
    args = [arg.format(index=index_dir, missing=tmp_path / "none") for arg in args]
    assert main(["caption", "--model", str(model_dir), *args, str(tmp_path / "query.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("vlm caption: error: ")
