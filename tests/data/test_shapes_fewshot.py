"""The fewshot shapes variant: determinism, every word of the query revealed before it, held-out
rules, the interleaved encoding = the few-shot prompt layout, the recipe's tokenizer, CLI and fit."""

import io
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vlm.cli import main as vlm_main
from vlm.data import shapes, shapes_fewshot
from vlm.data.cli import main as data_main
from vlm.data.corpus import write_corpus
from vlm.data.decode import decode_sample
from vlm.data.formats import EncodedSample, encode_sample
from vlm.data.shapes_fewshot import (MAX_SHOTS, SYLLABLES, chance_exact_match, fewshot_episode, read_caption,
                                     word_pool)
from vlm.data.writer import ShardWriter
from vlm.retrieval.prompts import Demonstration, fewshot_prompt
from vlm.text.chat import IGNORE_INDEX, ChatTemplate
from vlm.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = yaml.safe_load((ROOT / "configs" / "fewshot.yaml").read_text())


@pytest.fixture
def text_only(monkeypatch):
    """Documents without drawing their images: the tests of their text run 10x faster."""
    monkeypatch.setattr(shapes_fewshot, "render_scene", lambda scene: None)
    monkeypatch.setattr(shapes_fewshot, "encode_png", lambda image: b"")


def _documents(split: str, count: int, **options) -> list[dict]:
    return [fewshot_episode(seed=1, split=split, index=i, **options) for i in range(count)]


def _words(sample: dict) -> set[str]:
    """The made-up words of a document's captions."""
    real = {"a", "left", "of", *shapes.SIZES, *shapes.KINDS}
    return {word for segment in sample["json"]["segments"] if segment["type"] == "text"
            for word in segment["text"].replace(".", " ").split()} - real


def _rule_words(sample: dict) -> set[str]:
    return set(sample["json"]["rule"]["colour"].values())


def test_same_seed_same_bytes_and_episodes_keep_rule_and_query():
    keys = [(split, i) for split in ("train", "val") for i in range(6)]
    first = [shapes.make_sample("fewshot", seed=3, split=split, index=i) for split, i in keys]
    again = [shapes.make_sample("fewshot", seed=3, split=split, index=i) for split, i in keys]
    assert first == again
    assert first[0] != shapes.make_sample("fewshot", seed=4, split="train", index=0)
    assert fewshot_episode(seed=3, split="val", index=2) == first[8]  # the written document
    query = first[8]["json"]["scenes"][-1]
    for shots in (0, 1, 4, 8):
        for draw in (0, 1):
            episode = fewshot_episode(seed=3, split="val", index=2, shots=shots, draw=draw)["json"]
            assert episode["shots"] == shots and len(episode["scenes"]) == shots + 1
            assert episode["scenes"][-1] == query and episode["rule"] == first[8]["json"]["rule"]
    assert fewshot_episode(seed=3, split="val", index=2, shots=4, draw=0) != \
        fewshot_episode(seed=3, split="val", index=2, shots=4, draw=1)


def test_last_caption_is_revealed_by_earlier_pairs(text_only):
    documents = _documents("train", 150) + _documents("val", 50) + \
        [fewshot_episode(seed=2, split="val", index=i, shots=shots) for i in range(20) for shots in (1, 2, 4, 8)]
    for sample in documents:
        meta = sample["json"]
        rule, texts = meta["rule"], [s["text"] for s in meta["scenes"]]
        assert [seg["text"] for seg in meta["segments"][1::2]] == [text + "\n" for text in texts]
        read = [read_caption(text, rule) for text in texts]
        assert read == [shapes.parse_caption(s["caption"]) for s in meta["scenes"]]  # the rule renames, nothing else
        earlier = {colour for shown in read[:-1] for _, colour, _ in shown}
        assert {colour for _, colour, _ in read[-1]} <= earlier, texts
        assert meta["revealed"][-1] and not meta["revealed"][0]
        assert all(1 <= len(scene["shapes"]) <= shapes_fewshot.MAX_SHAPES for scene in meta["scenes"])
        assert {colour for shown in read for _, colour, _ in shown} <= set(rule["colour"])
        assert 0 < meta["chance"] <= 1 / 30
    assert {s["json"]["shots"] for s in documents[:200]} == set(range(1, MAX_SHOTS + 1))
    assert not fewshot_episode(seed=2, split="val", index=0, shots=0)["json"]["revealed"][-1]


def test_rules_are_bijections_and_val_rules_never_occur_in_train(text_only):
    words = {a + b for a in SYLLABLES for b in SYLLABLES if a != b}
    for colour in shapes.COLOURS:
        held_out, train = set(word_pool(colour, held_out=True)), set(word_pool(colour, held_out=False))
        assert not held_out & train and held_out | train == words and len(held_out) >= 30
    held_out_words = [w for c in shapes.COLOURS for w in word_pool(c, held_out=True)]
    assert sorted(held_out_words) == sorted(words)  # every word names exactly one colour in held-out documents
    train, val = _documents("train", 150), _documents("val", 50)
    for samples, held_out in ((train, False), (val, True)):
        for sample in samples:
            colours = sample["json"]["rule"]["colour"]
            assert list(colours) == [c for c in shapes.COLOURS if c in colours] and 2 <= len(colours) <= 4
            assert len({word[:2] for word in colours.values()}) == len(colours)  # first syllables name the words
            assert _words(sample) <= _rule_words(sample)
            assert all(word in word_pool(colour, held_out=held_out) for colour, word in colours.items())
    pairs = [{(c, w) for s in samples for c, w in s["json"]["rule"]["colour"].items()} for samples in (train, val)]
    assert not pairs[0] & pairs[1]
    assert {w for _, w in pairs[0]} & {w for _, w in pairs[1]}  # the words themselves are familiar
    test = shapes.make_sample("fewshot", seed=0, split="test", index=0)["json"]["rule"]["colour"]
    assert all(word in word_pool(colour, held_out=True) for colour, word in test.items())


def test_images_show_their_scenes_and_chance_has_no_rule():
    sample = fewshot_episode(seed=5, split="val", index=3, shots=4)
    for index, scene in enumerate(sample["json"]["scenes"]):
        pixels = np.asarray(Image.open(io.BytesIO(sample[f"{index}.png"])).convert("RGB"))
        shown = {name for name, rgb in shapes.COLOURS.items() if (pixels == rgb).all(-1).any()}
        assert shown == {shape["colour"] for shape in scene["shapes"]}
    query = shapes.sample_scene(random.Random(0))
    expected = math.prod(1 / len(word_pool(c, held_out=True)) for c in {s.colour for s in query.shapes})
    assert chance_exact_match(query) == pytest.approx(expected)
    with pytest.raises(ValueError, match="not a phrase"):
        read_caption("a small red circle.", sample["json"]["rule"])


def _fewshot_tokenizer(tmp_path: Path, samples: list[dict], vocab_size: int) -> Tokenizer:
    with ShardWriter(tmp_path / "shards", prefix="train", max_count=10_000) as writer:
        for sample in samples:
            writer.write(sample)
    write_corpus(sorted(map(str, (tmp_path / "shards").glob("train-*.tar"))), tmp_path / "corpus.txt")
    return Tokenizer.train([tmp_path / "corpus.txt"], vocab_size, show_progress=False)


def test_recipe_tokenizer_spells_every_word_in_syllables(tmp_path, text_only):
    """At the recipe's vocabulary size a tokenizer trained on training documents (as the data module
    trains it) has every syllable as a token and no word: held-out words are two tokens like the rest."""
    tokenizer = _fewshot_tokenizer(tmp_path, _documents("train", 600), RECIPE["data"]["tokenizer_vocab_size"])
    assert tokenizer.vocab_size <= RECIPE["model"]["config"]["text"]["vocab_size"]
    assert tokenizer.image_id == RECIPE["model"]["config"]["image_token_id"]
    for word in sorted({a + b for a in SYLLABLES for b in SYLLABLES if a != b}):
        assert [tokenizer.decode([i]) for i in tokenizer.encode(" " + word)] == [" " + word[:2], word[2:]], word


def test_document_encodes_as_the_few_shot_prompt_layout(tmp_path):
    """Decoded from its bytes, a document is an interleaved sample: <|begin_of_text|>, per pair
    <|image|> + caption + "\\n", then <|end_of_text|>; every caption learned. Its tokens are those
    of `fewshot_prompt` with the earlier pairs as demonstrations and the last caption as target."""
    samples = _documents("train", 20)
    tokenizer = _fewshot_tokenizer(tmp_path, samples, RECIPE["data"]["tokenizer_vocab_size"])
    sample = fewshot_episode(seed=1, split="val", index=7, shots=3)
    encoded = encode_sample(decode_sample(sample), ChatTemplate(tokenizer))
    assert isinstance(encoded, EncodedSample) and len(encoded.images) == 4
    texts = [scene["text"] for scene in sample["json"]["scenes"]]
    ids, labels = encoded.input_ids, encoded.labels
    assert ids[0] == tokenizer.bos_id and ids[-1] == labels[-1] == tokenizer.eos_id
    learned = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert learned == [t for text in texts for t in tokenizer.encode(text + "\n")] + [tokenizer.eos_id]
    unlearned = [t for t, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert unlearned == [tokenizer.bos_id] + [tokenizer.image_id] * 4
    demos = [Demonstration(text, image) for text, image in zip(texts[:-1], encoded.images)]
    prompt = fewshot_prompt(tokenizer, demos, encoded.images[-1], target=texts[-1])
    assert prompt.input_ids == ids[:-1] and prompt.images == encoded.images
    assert [t for t in prompt.labels if t != IGNORE_INDEX] == tokenizer.encode(texts[-1] + "\n")


@pytest.fixture(scope="module")
def fewshot_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fewshot") / "data"
    assert data_main(["shapes", "--out", str(out), "--train", "24", "--val", "8", "--seed", "0",
                      "--variants", "fewshot", "--workers", "1", "--no-progress"]) == 0
    return out


def test_cli_writes_fewshot_shards_only_when_named(fewshot_dir):
    manifest = json.loads((fewshot_dir / "manifest.json").read_text())
    assert manifest["variants"] == ["fewshot"] and "fewshot" not in shapes.DEFAULT_VARIANTS
    assert manifest["counts"]["fewshot"]["train"]["samples"] == 24
    with tarfile.open(fewshot_dir / "fewshot" / "val-000000.tar") as tar:
        names = tar.getnames()
        stored = json.loads(tar.extractfile("val_00000000.json").read())
    assert stored == json.loads(json.dumps(shapes.make_sample("fewshot", seed=0, split="val", index=0)["json"]))
    assert sum(n.endswith(".png") for n in names) == manifest["counts"]["fewshot"]["val"]["images"]


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_recipe_fits_two_steps(fewshot_dir, tmp_path, monkeypatch, fusion):
    tiny = {
        "trainer": {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1},
        "model": {"config": {"text": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64},
                             "vision": {"name": "timm", "model": "vit_tiny_patch16_224", "frozen": False,
                                        "feature_layer": -1, "image_size": 64,
                                        "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 1,
                                                         "num_heads": 2}}}},
        "data": {"train_shards": str(fewshot_dir / "fewshot" / "train-*.tar"),
                 "val_shards": str(fewshot_dir / "fewshot" / "val-*.tar"),
                 "tokenizer": str(tmp_path / "tokenizer.json"), "shapes": None,
                 "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "fewshot.yaml"),
            "--config", str(ROOT / "configs" / "fusion" / f"{fusion}.yaml"), "--config", "tiny.yaml"]
    if fusion == "flamingo":
        args += ["--model.config.fusion.options.max_images", "9"]  # as the recipe's header says
    assert vlm_main(args) == 0
    state = torch.load(tmp_path / "outputs" / "fewshot" / fusion / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and state["hyper_parameters"]["config"]["fusion"]["name"] == fusion
    if fusion == "flamingo":
        assert state["hyper_parameters"]["config"]["fusion"]["options"]["max_images"] == 9
