"""`vlm evaluate`: reading caption shards, scoring, the JSON report and the grid."""

import json
from collections import Counter

import pytest
from tiny_models import tiny_model_for

from vlm.cli import main
from vlm.data.shapes import make_shapes_dataset
from vlm.eval.evaluate import caption_examples, evaluate
from vlm.export import save_model


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=0, val=12, seed=1, workers=0, variants=["caption", "chat"])
    return out


class HalfRight:
    """Returns the reference for every second image and nonsense otherwise."""

    def __init__(self, refs):
        self.refs, self.calls = refs, 0

    def caption(self, images, **kwargs):
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
    skipped = Counter()
    assert list(caption_examples(sorted((shards / "chat").glob("val-*.tar")), skipped=skipped)) == []
    assert skipped == {"not a caption sample (chat)": 12}


def test_cli_writes_report_and_grid(shards, tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "model"
    save_model(tiny_model_for(tokenizer), model_dir, tokenizer=tokenizer)
    # the tiny model's images are 16 px; shapes are 64 px: the transform resizes them
    code = main(["evaluate", "--model", str(model_dir), "--data", str(shards / "caption" / "val-*.tar"),
                 "--limit", "5", "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["images"] == 5 and set(report["metrics"]) >= {"exact_match", "bleu4", "cider_d"}
    assert (tmp_path / "eval" / "captions.png").stat().st_size > 1000
    assert "exact match" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "none-*.tar")]) == 2
