"""Synthetic shapes: determinism, canonical captions re-derived from pixels, chat answers, layout."""

import io
import json
import random
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlm.data import shapes
from vlm.data.cli import main
from vlm.data.shapes import COLOURS, Scene, Shape


def _read_tar(path):
    """{key: {ext: bytes}} in file order, split at the first dot like webdataset."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _scene_from_pixels(image: Image.Image) -> list[tuple[str, str, str]]:
    """Recover (size, colour, kind) left to right from pixels alone, independent of the drawer."""
    pixels = np.asarray(image.convert("RGB"))
    colour_of = np.full(pixels.shape[:2], -1)
    names = list(COLOURS)
    for index, rgb in enumerate(COLOURS.values()):
        colour_of[(pixels == rgb).all(-1)] = index
    occupied = (colour_of >= 0).any(0)  # columns holding any shape pixel
    runs, start = [], None
    for x, filled in enumerate([*occupied, False]):
        if filled and start is None:
            start = x
        elif not filled and start is not None:
            runs.append((start, x))
            start = None
    small, large = (shapes.shape_extent(s, image.width) for s in ("small", "large"))
    found = []
    for x0, x1 in runs:
        block = colour_of[:, x0:x1]
        ys = np.nonzero((block >= 0).any(1))[0]
        colours = set(block[block >= 0].tolist())
        assert len(colours) == 1, f"one colour per shape, got {colours}"
        width, height = x1 - x0, ys[-1] - ys[0] + 1
        assert width == height, "bounding boxes are square"
        fill = (block >= 0).sum() / (width * height)
        kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        size = "large" if width > (small + large) / 2 else "small"
        found.append((size, names[colours.pop()], kind))
    return found


def test_caption_rederived_from_pixels():
    rng = random.Random(0)
    kinds_seen = set()
    for index in range(33 * 12):  # every image size from 64 to 96
        size = 64 + index % 33
        image, scene = shapes.draw_scene(rng, size)
        text = shapes.caption(scene)
        assert image.size == (size, size) and image.mode == "RGB"
        assert shapes.parse_caption(text) == _scene_from_pixels(image)
        assert 1 <= len(scene.shapes) <= 3 and text.count(" left of ") == len(scene.shapes) - 1
        kinds_seen |= {(s.kind, s.colour, s.size) for s in scene.shapes} | {scene.background}
    assert len(kinds_seen) == 3 * 6 * 2 + 3  # every kind x colour x size, every background


def test_parse_caption_rejects_non_captions():
    assert shapes.parse_caption("a small blue square left of a large red circle.") == [
        ("small", "blue", "square"), ("large", "red", "circle")]
    for bad in ["a small blue square", "a tiny blue square.", "a small blue square next to a red circle."]:
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)
    with pytest.raises(ValueError, match="image size"):
        shapes.sample_scene(random.Random(0), 50)


def _scene(*specs):
    """A hand-made 64 px scene from (kind, colour, size) triples, left to right."""
    placed = [Shape(k, c, s, 2 + 20 * i, 5, shapes.shape_extent(s, 64)) for i, (k, c, s) in enumerate(specs)]
    return Scene(64, "plain", ((230, 230, 230), (230, 230, 230)), 0, tuple(placed))


def test_refer_is_shortest_unique_description():
    scene = _scene(("circle", "red", "small"), ("circle", "blue", "small"), ("square", "red", "large"))
    assert shapes.refer(scene, 2) == "the square"
    assert shapes.refer(scene, 1) == "the blue one"
    assert shapes.refer(scene, 0) == "the red circle"
    assert shapes.refer(scene, 0, avoid="kind") == "the small red one"
    assert shapes.refer(scene, 0, avoid="colour") == "the leftmost shape"  # twin of the blue one
    assert shapes.refer(scene, 2, avoid="kind") == "the large one"
    twins = _scene(("circle", "red", "small"), ("circle", "red", "small"))
    assert [shapes.refer(twins, i) for i in (0, 1)] == ["the leftmost shape", "the rightmost shape"]
    assert shapes.refer(twins, 1, avoid="kind") == "the rightmost one"
    assert shapes.caption(twins) == "a small red circle left of a small red circle."


def _resolve(phrase: str, shapes_: list[dict]) -> int:
    """Index of the one shape a phrase like 'the large red one' names (asserts uniqueness)."""
    words = phrase.split()[1:]
    positions = {"leftmost": 0, "middle": 1, "rightmost": len(shapes_) - 1}
    if words[0] in positions:
        return positions[words[0]]
    matches = [i for i, s in enumerate(shapes_)
               if all(w in (s["size"], s["colour"], s["kind"], "one") for w in words)]
    assert len(matches) == 1, f"{phrase!r} is ambiguous or empty in {shapes_}"
    return matches[0]


def _check_answer(question: str, answer: str, shapes_: list[dict]) -> None:
    if question == "How many shapes are there?":
        assert answer == str(len(shapes_))
    elif m := re.fullmatch(r"What colour is (the .+)\?", question):
        assert answer == shapes_[_resolve(m[1], shapes_)]["colour"] and answer not in m[1]
    elif m := re.fullmatch(r"What shape is (the .+)\?", question):
        assert answer == shapes_[_resolve(m[1], shapes_)]["kind"] and answer not in m[1]
    elif m := re.fullmatch(r"Is (the .+) small or large\?", question):
        assert answer == shapes_[_resolve(m[1], shapes_)]["size"]
    elif m := re.fullmatch(r"How many shapes are left of (the .+)\?", question):
        assert answer == str(_resolve(m[1], shapes_))
    elif m := re.fullmatch(r"Is (the .+) left of (the .+)\?", question):
        a, b = _resolve(m[1], shapes_), _resolve(m[2], shapes_)
        assert a != b and answer == ("yes" if a < b else "no")
    else:
        raise AssertionError(f"unexpected question {question!r}")


def test_chat_answers_match_scene():
    for index in range(200):
        sample = shapes.make_sample("chat", seed=3, split="train", index=index)
        data = sample["json"]
        messages, shapes_ = data["messages"], data["scene"]["shapes"]
        assert set(sample) == {"__key__", "0.png", "json"}
        assert messages[0]["content"][0] == {"type": "image"}
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert 1 <= len(messages) // 2 <= 3
        for turn in range(0, len(messages), 2):
            user = messages[turn]["content"]
            question = user[1]["text"] if turn == 0 else user
            _check_answer(question, messages[turn + 1]["content"], shapes_)
        image = Image.open(io.BytesIO(sample["0.png"]))
        assert _scene_from_pixels(image) == [(s["size"], s["colour"], s["kind"]) for s in shapes_]


def test_interleaved_structure():
    for index in range(30):
        sample = shapes.make_sample("interleaved", seed=0, split="val", index=index)
        segments, scenes = sample["json"]["segments"], sample["json"]["scenes"]
        n = len(scenes)
        assert 2 <= n <= 3 and set(sample) == {"__key__", "json", *(f"{i}.png" for i in range(n))}
        assert [s["type"] for s in segments] == ["image", "text"] * n
        assert [s["index"] for s in segments[::2]] == list(range(n))
        for i in range(n):
            first_line = segments[2 * i + 1]["text"].split("\n")[0]
            pixels = _scene_from_pixels(Image.open(io.BytesIO(sample[f"{i}.png"])))
            assert shapes.parse_caption(first_line) == pixels
        total = sum(len(s["shapes"]) for s in scenes)
        assert segments[-1]["text"].endswith(f"The {n} pictures show {total} shapes in all.")


def test_dataset_layout_manifest_and_determinism(tmp_path):
    serial = shapes.make_shapes_dataset(tmp_path / "a", 10, 4, 7, shard_size=4, workers=0)
    parallel = shapes.make_shapes_dataset(tmp_path / "b", 10, 4, 7, shard_size=4, workers=2)
    assert serial == parallel
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files if f.parts[0] == "caption"] == [
        "caption/train-000000.tar", "caption/train-000001.tar", "caption/train-000002.tar",
        "caption/val-000000.tar"]
    for f in files:  # same seed -> byte-identical shards and manifest, whatever the workers
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest == serial and manifest["seed"] == 7 and manifest["splits"] == {"train": 10, "val": 4}
    assert manifest["variants"] == ["caption", "chat", "interleaved"]
    for variant, splits in manifest["counts"].items():
        for split, count in splits.items():
            samples = {}
            for shard in count["shards"]:
                samples.update(_read_tar(tmp_path / "a" / variant / shard))
            assert count["samples"] == len(samples) == {"train": 10, "val": 4}[split]
            assert count["images"] == sum(e.endswith("png") for s in samples.values() for e in s)
            assert list(samples) == [f"{split}_{i:08d}" for i in range(len(samples))]
    # Sample i depends only on (seed, variant, split, i): regenerate one alone.
    alone = shapes.make_sample("chat", seed=7, split="train", index=5)
    stored = _read_tar(tmp_path / "a/chat/train-000001.tar")["train_00000005"]
    assert stored["0.png"] == alone["0.png"] and json.loads(stored["json"]) == alone["json"]


def test_splits_and_seeds_differ():
    def pngs(seed, split):
        return {shapes.make_sample("caption", seed=seed, split=split, index=i)["png"] for i in range(200)}
    train = pngs(0, "train")
    assert len(train) == 200 and not train & pngs(0, "val") and not train & pngs(1, "train")


def test_cli_shapes(tmp_path, capsys):
    args = ["shapes", "--out", str(tmp_path), "--train", "3", "--val", "2", "--seed", "1",
            "--workers", "0", "--variants", "caption", "chat", "--image-size", "96", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "caption/train: 3 samples, 3 images, 1 shards" in out and "images/s" in out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["variants"] == ["caption", "chat"] and manifest["image_size"] == 96
    assert not (tmp_path / "interleaved").exists()
    png = _read_tar(tmp_path / "caption/val-000000.tar")["val_00000001"]["png"]
    assert Image.open(io.BytesIO(png)).size == (96, 96)
    assert main(args) == 2  # shards exist: refused without --overwrite
    assert "already holds shards train-*.tar" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
