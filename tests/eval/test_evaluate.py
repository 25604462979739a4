"""`vlm evaluate`: reading caption shards, scoring, the JSON report and the grid."""

import json
from collections import Counter

import pytest

from vlm.caption import Captioner
from vlm.cli import main
from vlm.data.shapes import make_shapes_dataset
from vlm.eval.baselines import most_frequent_caption
from vlm.eval.evaluate import caption_examples, evaluate
from vlm.eval.metrics import caption_metrics


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=16, val=12, seed=1, workers=0, variants=["caption", "chat"])
    return out


class HalfRight:
    """Returns the reference for every second image and nonsense otherwise."""

    def __init__(self, refs):
        self.refs, self.calls = refs, 0

    def caption(self, images, **kwargs):
        self.kwargs = kwargs
        out = []
        for _ in images:
            out.append(self.refs[self.calls].upper() if self.calls % 2 == 0 else "a purple cloud.")
            self.calls += 1
        return out


def test_scores_and_counts(shards):
    examples = list(caption_examples(sorted((shards / "caption").glob("val-*.tar"))))
    assert len(examples) == 12 and all(e.references for e in examples)
    report = evaluate(HalfRight([e.references[0] for e in examples]), sorted((shards / "caption").glob("val-*.tar")),
                      batch_size=5, progress=False)
    assert report["metrics"]["exact_match"] == 0.5
    assert [s["exact"] for s in report["samples"]] == [True, False] * 6
    # shapes samples carry their scene: the right half is exact, "a purple cloud." is malformed
    assert report["hallucination"]["exact_rate"] == 0.5 and report["hallucination"]["malformed_rate"] == 0.5
    assert report["hallucination"]["hallucination_rate"] == 0.0
    assert [s["errors"] for s in report["samples"]] == [[], None] * 6
    skipped = Counter()
    assert list(caption_examples(sorted((shards / "chat").glob("val-*.tar")), skipped=skipped)) == []
    assert skipped == {"not a caption sample (chat)": 12}



def test_cli_writes_report_and_grid(shards, model_dir, tmp_path, capsys):
    # the tiny model's images are 16 px; shapes are 64 px: the transform resizes them
    code = main(["evaluate", "--model", str(model_dir), "--data", str(shards / "caption" / "val-*.tar"),
                 "--limit", "5", "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["images"] == 5 and set(report["metrics"]) >= {"exact_match", "bleu4", "cider_d"}
    assert (tmp_path / "eval" / "captions.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "exact match" in out and "of captions contradict their image" in out and "hallucination_rate" in report["hallucination"]
    assert main(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "none-*.tar")]) == 2


def test_cli_baselines(shards, model_dir, tmp_path, capsys):
    val, train = str(shards / "caption" / "val-*.tar"), str(shards / "caption" / "train-*.tar")
    code = main(["evaluate", "--model", str(model_dir), "--data", val, "--max-new-tokens", "4", "--batch-size", "5",
                 "--baselines", "--train", train, "--out", str(tmp_path / "eval")])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    baselines = report["baselines"]
    assert baselines["train_images"] == 16 and report["images"] == 12
    references = [s["references"] for s in report["samples"]]
    train_examples = list(caption_examples(sorted((shards / "caption").glob("train-*.tar"))))
    common = most_frequent_caption(r for e in train_examples for r in e.references)
    assert baselines["most_frequent"]["caption"] == common
    assert baselines["most_frequent"]["metrics"] == caption_metrics([common] * 12, references)
    retrieved = [s["retrieved"]["caption"] for s in report["samples"]]
    assert baselines["retrieval"]["metrics"] == caption_metrics(retrieved, references)
    train_captions = {e.key: e.references[0] for e in train_examples}
    assert all(train_captions[s["retrieved"]["key"]] == s["retrieved"]["caption"] for s in report["samples"])
    for section in (report["metrics"], baselines["most_frequent"]["metrics"], baselines["retrieval"]["metrics"]):
        assert {"exact_match", "bleu4", "cider_d"} <= set(section)
    out = capsys.readouterr().out
    table = out.splitlines()
    header = next(i for i, line in enumerate(table) if "exact match" in line)
    assert [line.split()[0] for line in table[header + 1 : header + 4]] == ["model", "most", "retrieval"]
    m = baselines["retrieval"]["metrics"]
    assert table[header + 3].split()[1:] == [f"{m['exact_match']:.3f}", f"{m['bleu4']:.3f}", f"{m['cider_d']:.3f}"]


def test_cli_baselines_retrieve_the_image_itself(shards, model_dir, tmp_path):
    """The evaluated shards as training set: every image finds itself, so retrieval is exact."""
    val = str(shards / "caption" / "val-*.tar")
    assert main(["evaluate", "--model", str(model_dir), "--data", val, "--max-new-tokens", "1",
                 "--baselines", "--train", val, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["retrieved"]["key"] for s in report["samples"]] == [s["key"] for s in report["samples"]]
    assert report["baselines"]["retrieval"]["metrics"]["exact_match"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--baselines"], "--baselines needs --train"),
    (["--train", "x-*.tar"], "only used with --baselines"),
    (["--baselines", "--train", "nothing-*.tar"], "--train: no training shard at"),
    (["--num-beams", "0"], "--num-beams must be >= 1"),
])
def test_cli_baselines_bad_input_is_one_line(shards, model_dir, capsys, args, message):
    val = str(shards / "caption" / "val-*.tar")
    assert main(["evaluate", "--model", str(model_dir), "--data", val, *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err and captured.err.startswith("vlm evaluate: ")
    assert captured.out == ""


def test_beam_search_options_are_passed_through_and_recorded(shards, model_dir, tmp_path):
    search = {"num_beams": 3, "length_penalty": 0.5, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2}
    stub = HalfRight(["x"] * 12)
    report = evaluate(stub, sorted((shards / "caption").glob("val-*.tar")), batch_size=5, max_new_tokens=7,
                      search=search, progress=False)
    assert stub.kwargs == {"max_new_tokens": 7, "batch_size": 5, **search}
    assert report["settings"] == {"limit": None, "batch_size": 5, "max_new_tokens": 7, **search}

    val = str(shards / "caption" / "val-*.tar")
    assert main(["evaluate", "--model", str(model_dir), "--data", val, "--limit", "3", "--max-new-tokens", "4",
                 "--num-beams", "2", "--length-penalty", "0.5", "--no-repeat-ngram-size", "2",
                 "--repetition-penalty", "1.2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    beams = {"num_beams": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2}
    assert report["settings"] == {"limit": 3, "batch_size": 32, "max_new_tokens": 4, **beams}
    images = [e.image for e in caption_examples(sorted((shards / "caption").glob("val-*.tar")), limit=3)]
    expected = Captioner.from_directory(model_dir).caption(images, max_new_tokens=4, batch_size=32, **beams)
    assert [s["prediction"] for s in report["samples"]] == expected


def test_cli_baselines_from_a_feature_cache_equal_running_the_tower(shards, model_dir, tmp_path, capsys):
    from vlm.export import load_model
    from vlm.features import build_features

    val, train = str(shards / "caption" / "val-*.tar"), str(shards / "caption" / "train-*.tar")
    model = load_model(model_dir).requires_grad_(False)
    build_features(model, sorted((shards / "caption").glob("train-*.tar")), tmp_path / "cache", progress=False)
    reports = {}
    for name, extra in (("tower", []), ("cached", ["--features", str(tmp_path / "cache")])):
        assert main(["evaluate", "--model", str(model_dir), "--data", val, "--max-new-tokens", "1", "--baselines",
                     "--train", train, "--out", str(tmp_path / name), *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["cached"]["baselines"]["retrieval"] == reports["tower"]["baselines"]["retrieval"]
    for ours, theirs in zip(reports["cached"]["samples"], reports["tower"]["samples"]):
        assert ours["retrieved"]["key"] == theirs["retrieved"]["key"]
        assert abs(ours["retrieved"]["similarity"] - theirs["retrieved"]["similarity"]) <= 1e-5
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model_dir), "--data", val, "--features", str(tmp_path / "cache")]) == 2
    assert "--features is only used by the retrieval baseline" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(model_dir), "--data", val, "--baselines", "--train", val,
                 "--features", str(tmp_path / "cache")]) == 2  # the cache holds no val sample
    assert "has no features for training sample" in capsys.readouterr().err
