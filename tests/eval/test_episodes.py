"""Few-shot evaluation on the shapes few-shot documents (`vlm evaluate --shots` without --demos):
episodes rebuild the shard's documents, the report equals scoring the same predictions directly,
the command end to end, and one-line errors."""

import json
import statistics

import pytest
from PIL import Image

from vlm.caption import Captioner
from vlm.cli import main
from vlm.data.decode import decode_sample, iter_shard_samples
from vlm.data.shapes import make_shapes_dataset
from vlm.data.shapes_fewshot import fewshot_episode
from vlm.errors import UserError
from vlm.eval.episodes import episode, episode_evaluate, malformed_rate, read_documents
from vlm.eval.metrics import caption_metrics
from vlm.export import load_model


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot")
    make_shapes_dataset(out, train=0, val=5, seed=4, workers=0, variants=["fewshot"], image_size=72)
    return sorted((out / "fewshot").glob("val-*.tar"))


class LastCaption(Captioner):
    """Captions each query with its last demonstration's caption (a colour no document renames when
    there is none), without generating."""

    def caption_fewshot(self, images, demonstrations, **kwargs):
        return [demos[-1].caption if demos else "a small red circle." for demos in demonstrations]


def test_an_episode_with_the_written_shots_is_the_shards_document(documents):
    found, generator = read_documents(documents)
    assert (generator.seed, generator.image_size, len(found)) == (4, 72, 5)
    with open(documents[0], "rb") as stream:
        written = [decode_sample(raw) for raw in iter_shard_samples(stream, str(documents[0]), max_member_bytes=2**24)]
    for document, sample in zip(found, written):
        meta = sample["json"]
        demos, query = episode(document, generator, meta["shots"], 0)
        assert [d.caption for d in demos] == [scene["text"] for scene in meta["scenes"][:-1]]
        pictures = [d.image for d in demos] + [query]
        assert [list(p.getdata()) for p in pictures] == [list(sample[f"{i}.png"].convert("RGB").getdata())
                                                        for i in range(meta["shots"] + 1)]
        assert document.reference == meta["scenes"][-1]["text"] and document.chance == meta["chance"]


def test_report_equals_direct_scoring(documents, model_dir, tokenizer):
    captioner = LastCaption(load_model(model_dir), tokenizer)
    report = episode_evaluate(captioner, documents, [2, 0, 1], seeds=2, batch_size=2, progress=False)
    found, generator = read_documents(documents)
    references = [[d.reference] for d in found]
    results = report["fewshot"]["results"]["document"]
    assert list(results) == ["0", "1", "2"] and [results[k]["runs"] for k in results] == [1, 2, 2]
    for k in (1, 2):
        runs = []
        for draw in range(2):
            direct = [episode(d, generator, k, draw)[0][-1].caption for d in found]
            assert [s["predictions"]["document"][str(k)][draw] for s in report["samples"]] == direct
            runs.append({**caption_metrics(direct, references), "malformed": 0.0})
        for name in ("exact_match", "cider_d", "bleu4", "malformed"):
            assert results[str(k)]["mean"][name] == pytest.approx(statistics.fmean(r[name] for r in runs), abs=1e-12)
            assert results[str(k)]["std"][name] == pytest.approx(statistics.pstdev(r[name] for r in runs), abs=1e-12)
    assert results["0"]["mean"]["malformed"] == 1.0 and results["0"]["mean"]["exact_match"] == 0.0
    assert report["fewshot"]["chance"] == pytest.approx(statistics.fmean(d.chance for d in found))


def test_malformed_means_not_in_the_documents_words(documents):
    found, _ = read_documents(documents, limit=1)
    word = next(iter(found[0].rule["colour"].values()))
    good, bad = f"a small {word} circle.", f"a small {word} circle"
    assert malformed_rate([good, "a small red circle.", bad, found[0].reference], found * 4) == 0.5


def test_cli_writes_mean_std_per_shot_count_and_the_plot(documents, model_dir, tmp_path, capsys):
    assert main(["evaluate", "--model", str(model_dir), "--data", str(documents[0]), "--shots", "0", "2",
                 "--seeds", "2", "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    results = report["fewshot"]["results"]["document"]
    assert set(results) == {"0", "2"} and results["2"]["runs"] == 2 and report["images"] == 3
    assert {"exact_match", "malformed"} <= set(results["2"]["mean"]) == set(results["2"]["std"])
    with Image.open(tmp_path / "shots.png") as plot:
        assert plot.size == (840, 320)
    out = capsys.readouterr().out
    assert "own rule; chance exact match" in out and "malformed" in out
    captioner = Captioner.from_directory(model_dir)
    found, generator = read_documents(documents, limit=3)
    episodes = [episode(d, generator, 2, 1) for d in found]
    direct = captioner.caption_fewshot([q for _, q in episodes], [d for d, _ in episodes], max_new_tokens=4)
    assert [s["predictions"]["document"]["2"][1] for s in report["samples"]] == direct


def test_a_changed_generator_or_manifest_is_one_line(documents, tmp_path):
    found, generator = read_documents(documents, limit=1)
    with pytest.raises(UserError, match="rebuilds another document than the shard's"):
        episode(found[0], type(generator)(generator.seed + 1, generator.image_size), 1, 0)
    (tmp_path / "fewshot").mkdir()
    (tmp_path / "fewshot" / "val-000000.tar").write_bytes(documents[0].read_bytes())
    with pytest.raises(UserError, match="manifest.json: the shapes manifest"):
        read_documents([tmp_path / "fewshot" / "val-000000.tar"])
    assert fewshot_episode(seed=4, split="val", index=0)["json"]["rule"] == found[0].rule
