"""Few-shot evaluation (`vlm evaluate --shots`): selection by seed and by RICES, the prompts' order,
the report's statistics against direct scoring, the plot, and one-line errors."""

import json
import statistics

import pytest
import torch
from PIL import Image

from vlm.caption import Captioner
from vlm.cli import main
from vlm.data.examples import caption_examples
from vlm.data.shapes import make_shapes_dataset
from vlm.errors import UserError
from vlm.eval.baselines import embed_images
from vlm.eval.fewshot import FewShotPlan, fewshot_evaluate, random_choices, rices_choices
from vlm.eval.hallucination import hallucination_metrics
from vlm.eval.metrics import caption_metrics
from vlm.export import load_model
from vlm.retrieval import Demonstration, Entry, Index, build_index


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=16, val=6, seed=2, workers=0, variants=["caption"], shard_size=10)
    return out / "caption"  # train-000000.tar (10 samples), train-000001.tar (6), val-000000.tar



@pytest.fixture(scope="module")
def index_dir(shards, model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "index"
    build_index(load_model(model_dir), sorted(shards.glob("train-*.tar")), path, progress=False)
    return path


@pytest.fixture(scope="module")
def train(shards):
    return sorted(str(s) for s in shards.glob("train-*.tar"))


class LastCaption(Captioner):
    """Captions each query with its last (most similar) demonstration's caption, without generating,
    and records the demonstrations it was given."""

    def caption_fewshot(self, images, demonstrations, **kwargs):
        self.calls = getattr(self, "calls", []) + [demonstrations]
        return [demos[-1].caption if demos else "a small red circle." for demos in demonstrations]


def test_random_selection_is_seeded_per_query_and_never_the_query():
    pool = [Entry(f"k{i}", (f"caption {i}.",), "shard.tar", "png") for i in range(10)]
    keys = ["k3", "q", "k7"]
    first = random_choices(pool, keys, 4, seed=0)
    assert random_choices(pool, keys, 4, seed=0) == first  # deterministic
    assert random_choices(pool, keys[::-1], 4, seed=0) == first[::-1]  # per query: not by position or batch
    assert random_choices(pool, keys, 4, seed=1) != first
    for key, chosen in zip(keys, first):
        assert len({e.key for e in chosen}) == 4 and key not in {e.key for e in chosen}
    everyone = random_choices(pool, ["k3"], 9, seed=5)[0]  # all but itself
    assert sorted(e.key for e in everyone) == sorted(f"k{i}" for i in range(10) if i != 3)
    with pytest.raises(UserError, match="9 caption sample"):
        random_choices(pool, ["k3"], 10, seed=0)


def test_rices_is_the_brute_force_nearest_neighbours(shards, model_dir, index_dir, train):
    """Queries taken from the training shards: each finds its own image first by brute force, which
    RICES must skip."""
    model = load_model(model_dir)
    examples = list(caption_examples(train))
    vectors = embed_images(model, [e.image for e in examples], progress=False)  # [N, D], unit rows
    similarity = vectors @ vectors.T
    chosen = rices_choices(Index.load(index_dir), model, [e.image for e in examples], [e.key for e in examples], 3)
    for row, found in enumerate(chosen):
        order = [i for i in torch.argsort(similarity[row], descending=True).tolist() if i != row][:3]
        assert [e.key for e in found] == [examples[i].key for i in order]


def test_rices_prompts_put_the_most_similar_last_and_report_equals_direct_scoring(shards, model_dir, index_dir,
                                                                                 train, tokenizer):
    captioner = LastCaption(load_model(model_dir), tokenizer)
    plan = FewShotPlan((0, 1, 3), ("random", "rices"), seeds=3, demos=tuple(train), index=str(index_dir))
    report = fewshot_evaluate(captioner, train, plan, limit=7, batch_size=4, progress=False)
    examples = list(caption_examples(train, limit=7))
    model = load_model(model_dir)
    vectors = embed_images(model, [e.image for e in caption_examples(train)], progress=False)
    for sample, row in zip(report["samples"], range(7)):
        order = [i for i in torch.argsort(vectors @ vectors[row], descending=True).tolist() if i != row]
        assert sample["demonstrations"]["rices"] == [[f"train_{i:08d}" for i in order[:3]]]  # best first
        assert len(sample["demonstrations"]["random"]) == 3  # one draw per seed
        assert all(sample["key"] not in keys for keys in sample["demonstrations"]["random"])
    # the prompts: the k best, most similar last (next to the query), with their images
    rices_call = [call for call in captioner.calls if len(call[0]) == 3][-1]  # 3 shots; rices runs last
    assert [[d.key for d in demos] for demos in rices_call] == [s["demonstrations"]["rices"][0][::-1]
                                                                  for s in report["samples"]]
    pool = {e.key: e for e in caption_examples(train)}
    assert all(torch.equal(d.image, captioner.transform(pool[d.key].image)) and d.caption == pool[d.key].references[0]
               for demos in rices_call for d in demos)
    # every number of the report is the direct scoring of the predictions it stores
    references = [e.references for e in examples]
    scenes = [e.scene for e in examples]
    results = report["fewshot"]["results"]
    assert {method: {k: r["runs"] for k, r in by.items()} for method, by in results.items()} == {
        "random": {"0": 1, "1": 3, "3": 3}, "rices": {"0": 1, "1": 1, "3": 1}}
    for method, by_shots in results.items():
        for k, result in by_shots.items():
            runs = [[s["predictions"][method][k][run] for s in report["samples"]] for run in range(result["runs"])]
            for predictions, metrics in zip(runs, result["per_run"]):
                assert metrics == {**caption_metrics(predictions, references),
                                   "hallucination_rate": hallucination_metrics(predictions, scenes)["hallucination_rate"]}
            for name in ("exact_match", "cider_d", "bleu4", "hallucination_rate"):
                values = [run[name] for run in result["per_run"]]
                assert result["mean"][name] == statistics.fmean(values)
                assert result["std"][name] == statistics.pstdev(values)
    assert results["random"]["0"] == results["rices"]["0"]  # the one shared 0-shot run
    assert results["random"]["3"]["std"]["cider_d"] > 0  # seeds draw different demonstrations
    nearest = [int(torch.argsort(vectors @ vectors[row], descending=True)[1]) for row in range(7)]
    assert [s["predictions"]["rices"]["1"][0] for s in report["samples"]] == [  # 1 shot: the nearest one's caption
        list(pool.values())[i].references[0] for i in nearest]


def test_cli_shots_end_to_end(shards, model_dir, index_dir, train, tmp_path, capsys):
    """A real tiny model, both selections, 2 seeds: report, plot and table; predictions equal the
    captioner's own few-shot captions of the same demonstrations."""
    val = str(shards / "val-*.tar")
    assert main(["evaluate", "--model", str(model_dir), "--data", val, "--shots", "0", "2", "--select", "random",
                 "rices", "--seeds", "2", "--demos", str(shards / "train-*.tar"), "--index", str(index_dir),
                 "--max-new-tokens", "4", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    results = report["fewshot"]["results"]
    assert set(results) == {"random", "rices"} and all(set(by) == {"0", "2"} for by in results.values())
    assert results["random"]["2"]["runs"] == 2 and len(results["random"]["2"]["per_run"]) == 2
    for result in (r for by in results.values() for r in by.values()):
        assert {"exact_match", "cider_d", "hallucination_rate"} <= set(result["mean"]) == set(result["std"])
    assert report["fewshot"]["zero_shot_prompt"] == "<|begin_of_text|><|image|>" and report["images"] == 6
    with Image.open(tmp_path / "shots.png") as plot:
        assert plot.size == (840, 320)
    out = capsys.readouterr().out
    assert "exact match" in out and "CIDEr-D" in out and "hallucination" in out
    assert len([line for line in out.splitlines() if line.split()[:1] in (["random"], ["rices"])]) == 4
    captioner = Captioner.from_directory(model_dir)
    images = [e.image for e in caption_examples(sorted(shards.glob("val-*.tar")))]
    pool = {e.key: e for e in caption_examples(train)}
    for method, run in (("random", 1), ("rices", 0)):
        chosen = [s["demonstrations"][method][run][:2][::-1] for s in report["samples"]]  # 2 best, best last
        demos = [[Demonstration(pool[key].references[0], pool[key].image, key) for key in keys] for keys in chosen]
        direct = captioner.caption_fewshot(images, demos, max_new_tokens=4, batch_size=3)
        assert [s["predictions"][method]["2"][run] for s in report["samples"]] == direct
    assert [s["predictions"]["rices"]["0"][0] for s in report["samples"]] == captioner.caption_fewshot(
        images, [[] for _ in images], max_new_tokens=4)


@pytest.mark.parametrize("args, message", [
    (["--shots", "0", "2"], "sample 'val_00000000' is not a shapes few-shot document"),
    (["--shots", "2", "--select", "random"], "--select and --index choose demonstrations from --demos"),
    (["--shots", "2", "--demos", "{train}", "--select", "rices"], "--select rices needs --index INDEX"),
    (["--shots", "2", "--demos", "{train}", "--index", "{index}"], "--index is used by --select rices only"),
    (["--select", "random"], "options of few-shot evaluation; add --shots"),
    (["--shots", "-1"], "--shots must be >= 0"),
    (["--shots", "2", "--demos", "{train}", "--seeds", "0"], "--seeds must be >= 1"),
    (["--shots", "2", "--demos", "{val}", "--baselines", "--train", "{train}"], "--shots is its own protocol"),
    (["--shots", "2", "--demos", "nothing-*.tar"], "--demos: no training shard at"),
    (["--shots", "2", "--demos", "{val}", "--select", "rices", "--index", "{index}"],
     "was built over 2 shard(s) other than the 1 of --demos"),
    (["--shots", "3", "--demos", "{train}", "--max-new-tokens", "5000"],
     r"3 demonstration(s) is too long: 4 image(s) x 4 token(s) + "),
    (["-k", "2"], "-k and --retrieve-mode choose what --retrieve INDEX puts in the prompt"),
])
def test_bad_combinations_are_one_line(shards, model_dir, index_dir, capsys, args, message):
    values = {"train": str(shards / "train-*.tar"), "val": str(shards / "val-*.tar"), "index": str(index_dir)}
    args = [arg.format(**values) for arg in args]
    assert main(["evaluate", "--model", str(model_dir), "--data", values["val"], *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err and captured.err.startswith("vlm evaluate: ")
    if "too long" in message:
        assert "max_new_tokens 5000" in captured.err and "> max_seq_len 2048" in captured.err
