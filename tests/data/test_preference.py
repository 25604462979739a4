"""Preference pairs: encoding (labels only on answers), collation layout, pipeline skip/strict,
the shapes preference variant (exactly one wrong attribute, determinism), from-preference."""

import io
import json
import logging
import random
import tarfile

import pytest
import torch
from PIL import Image

from vlm.data import shapes
from vlm.data.cli import main
from vlm.data.collate import Collator
from vlm.data.decode import SampleError, decode_sample
from vlm.data.formats import EncodedPreference, EncodedSample, encode_sample, sample_kind
from vlm.data.pipeline import PipelineConfig, SkipCounter, build_pipeline
from vlm.data.preference import convert_preference

X = -100
PAD, IMG = 0, 9


def user_image(text):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


# --- encoding ----------------------------------------------------------------------------------

def test_encode_learns_only_the_answer_after_an_identical_prompt(template, tokenizer):
    tok = tokenizer
    messages = [{"role": "system", "content": "Be brief."}, user_image("What shape is this?"),
                {"role": "assistant", "content": "It is a circle."}, {"role": "user", "content": "And this?"}]
    image = Image.new("RGB", (10, 10), (255, 0, 0))
    sample = {"__key__": "p1", "0.png": image,
              "json": {"messages": messages, "chosen": "a red square", "rejected": "a blue circle", "extra": 1}}
    assert sample_kind(sample) == "preference"
    assert sample_kind({"json": {"messages": [], "chosen": "x"}}) == "preference"  # a bad one, not a chat
    encoded = encode_sample(sample, template)
    assert isinstance(encoded, EncodedPreference) and encoded.key == "p1" and encoded.images == [image]
    prompt, _ = template.render(messages, add_generation_prompt=True)
    for ids, labels, text in [(encoded.chosen_ids, encoded.chosen_labels, "a red square"),
                              (encoded.rejected_ids, encoded.rejected_labels, "a blue circle")]:
        answer = [*tok.encode(text), tok.eot_id]
        assert ids == prompt + answer
        assert labels == [X] * len(prompt) + answer  # the earlier assistant turn is not learned
    assert prompt.count(tok.image_id) == 1


@pytest.mark.parametrize(("meta", "images", "reason", "message"), [
    ({"chosen": "same", "rejected": "same"}, 1, "bad preference", "same answer"),
    ({"chosen": "yes"}, 1, "bad preference", "rejected must be a non-empty string"),
    ({"chosen": "  ", "rejected": "no"}, 1, "bad preference", "chosen must be"),
    ({"chosen": "yes", "rejected": ["no"]}, 1, "bad preference", "rejected must be"),
    ({"chosen": "yes", "rejected": "no", "extra_turn": True}, 1, "bad preference", "ending with a user turn"),
    ({"chosen": "yes", "rejected": "no"}, 2, "image mismatch", "1 image part"),
    ({"chosen": "yes", "rejected": "no", "robot": True}, 1, "bad sample", "unknown role"),
])
def test_bad_pairs_name_key_and_reason(template, meta, images, reason, message):
    messages = [user_image("Which?")]
    if meta.pop("extra_turn", False):
        messages.append({"role": "assistant", "content": "an answer in the prompt"})
    if meta.pop("robot", False):
        messages.insert(0, {"role": "robot", "content": "hi"})
    sample = {"__key__": "bad/pair", "json": {"messages": messages, **meta},
              **{f"{i}.png": Image.new("RGB", (4, 4)) for i in range(images)}}
    with pytest.raises(SampleError, match=message) as caught:
        encode_sample(sample, template)
    assert caught.value.reason == reason and caught.value.key == "bad/pair"


# --- collation ---------------------------------------------------------------------------------

def pair(key, prompt, chosen, rejected, images=()):
    return EncodedPreference(key, prompt + chosen, [X] * len(prompt) + chosen,
                             prompt + rejected, [X] * len(prompt) + rejected, list(images))


def image(value):
    return torch.full((3, 2, 2), float(value))


def test_collate_pairs_rows_then_images_once():
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=2)
    batch = collator([pair("a", [1, IMG, 2], [3, 4], [5], [image(1)]),
                      pair("b", [1, 6], [7], [8, 8, 8]),
                      pair("c", [1, IMG, IMG], [4], [5], [image(2), image(3)])])
    assert batch.pairs == 3 and batch.keys == ("a", "b", "c", "a", "b", "c")
    assert batch.input_ids.tolist() == [
        [1, IMG, IMG, 2, 3, 4], [1, 6, 7, PAD, PAD, PAD], [1, IMG, IMG, IMG, IMG, 4],  # chosen
        [1, IMG, IMG, 2, 5, PAD], [1, 6, 8, 8, 8, PAD], [1, IMG, IMG, IMG, IMG, 5]]  # rejected
    assert batch.labels.tolist() == [
        [X, X, X, X, 3, 4], [X, X, 7, X, X, X], [X, X, X, X, X, 4],
        [X, X, X, X, 5, X], [X, X, 8, 8, 8, X], [X, X, X, X, X, 5]]
    assert batch.attention_mask.sum(1).tolist() == [6, 3, 6, 5, 5, 6]
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]  # once per pair, in pair order
    assert batch.image_sample_index.tolist() == [0, 2, 2]  # the pair, not the row
    assert batch.to("meta").pairs == 3
    plain = collator([EncodedSample("s", [1, IMG], [X, X], [image(1)])])
    assert plain.pairs is None


def test_collate_pairs_truncates_both_rows_alike_and_drops_pairs_without_room(caplog):
    collator = Collator(pad_id=PAD, image_id=IMG, image_token_count=3, max_length=6)
    fits = pair("fits", [1, IMG], [2, 3, 4], [5], [image(1)])  # prompt 4 tokens expanded
    too_long = pair("long", [1, IMG, 6, 6], [2], [5], [image(2)])  # prompt 6 tokens: no room
    with caplog.at_level(logging.WARNING):
        batch = collator([too_long, fits])
    assert batch.pairs == 1 and batch.keys == ("fits", "fits")
    assert batch.input_ids.tolist() == [[1, IMG, IMG, IMG, 2, 3], [1, IMG, IMG, IMG, 5, PAD]]
    assert batch.image_sample_index.tolist() == [0] and batch.pixel_values[:, 0, 0, 0].tolist() == [1.0]
    assert collator.dropped_pairs == 1 and collator.dropped_images == 0 and "'long'" in caplog.text
    with pytest.raises(ValueError, match="no preference pair of this batch fits max_length 6"):
        collator([too_long])


def test_collate_refuses_mixed_batches_and_unshared_prompts():
    collator = Collator(pad_id=PAD, image_id=IMG)
    with pytest.raises(ValueError, match="cannot mix preference pairs with other samples"):
        collator([pair("p", [1], [2], [3]), EncodedSample("s", [1, 2], [X, 2])])
    odd = EncodedPreference("odd", [1, 2, 3], [X, X, 3], [1, 4, 3], [X, X, 3], [])
    with pytest.raises(ValueError, match="'odd'.*share their prompt"):
        collator([odd])


# --- pipeline: skip and strict -----------------------------------------------------------------

def preference_sample(helpers, key, chosen, rejected, *, images=1, messages=None):
    meta = {"messages": messages or [user_image("Which shape?")], "chosen": chosen, "rejected": rejected}
    meta = {k: v for k, v in meta.items() if v is not None}
    return {"__key__": key, "json": meta, **{f"{i}.png": helpers.image_bytes() for i in range(images)}}


BAD = {  # key -> (sample arguments, reason)
    "same": (("a circle", "a circle"), {}, "bad preference"),
    "norejected": (("a circle", None), {}, "bad preference"),
    "emptychosen": (("", "a circle"), {}, "bad preference"),
    "twoimages": (("a circle", "a square"), {"images": 2}, "image mismatch"),
}


def test_pipeline_skips_and_counts_bad_pairs_strict_names_them(tmp_path, template, tokenizer, collator, helpers):
    good = [preference_sample(helpers, f"good{i}", "a red square", f"a blue circle {i}") for i in range(2)]
    bad = [preference_sample(helpers, key, *args, **kwargs) for key, (args, kwargs, _) in BAD.items()]
    shard = helpers.write_shard(tmp_path / "pairs-000000.tar", [good[0], *bad, good[1]])
    counter = SkipCounter()
    config = PipelineConfig([shard], batch_size=8, shuffle=False, handler="skip", max_skip_fraction=1.0)
    (batch,) = build_pipeline(config, template, transform=helpers.to_tensor, collator=collator, counter=counter)
    assert batch.pairs == 2 and batch.keys == ("good0", "good1") * 2 and batch.input_ids.shape[0] == 4
    assert counter.counts() == {"bad preference": 3, "image mismatch": 1} and counter.seen == 6
    for key, (args, kwargs, reason) in BAD.items():
        bad_one = preference_sample(helpers, key, *args, **kwargs)
        strict = helpers.write_shard(tmp_path / f"strict-{key}.tar", [good[0], bad_one])
        config = PipelineConfig([strict], batch_size=2, shuffle=False, handler="strict")
        with pytest.raises(SampleError) as caught:
            list(build_pipeline(config, template, transform=helpers.to_tensor, collator=collator))
        assert caught.value.reason == reason and f"'{key}'" in str(caught.value) and strict in str(caught.value)


# --- shapes preference variant -----------------------------------------------------------------

def changed_attribute(true, wrong):
    """The one attribute in which caption `wrong` differs from `true` ((size, colour, kind) lists),
    or None when it is not exactly one."""
    if abs(len(true) - len(wrong)) == 1:
        longer, shorter = (true, wrong) if len(true) > len(wrong) else (wrong, true)
        return "count" if any(longer[:i] + longer[i + 1:] == shorter for i in range(len(longer))) else None
    if len(true) != len(wrong):
        return None
    diffs = [i for i in range(len(true)) if true[i] != wrong[i]]
    if len(diffs) == 1:
        fields = [f for f, a, b in zip(("size", "colour", "kind"), true[diffs[0]], wrong[diffs[0]]) if a != b]
        return fields[0] if len(fields) == 1 else None
    i = diffs[0] if diffs else 0
    if len(diffs) == 2 and diffs[1] == i + 1 and (true[i], true[i + 1]) == (wrong[i + 1], wrong[i]):
        return "order"
    return None


def test_wrong_caption_differs_in_exactly_one_attribute():
    rng, seen = random.Random(0), set()
    for _ in range(2000):  # scenes only (no rendering): fast
        scene = shapes.sample_scene(rng)
        text, attribute = shapes.wrong_caption(scene, rng)
        assert changed_attribute(shapes.parse_caption(shapes.caption(scene)), shapes.parse_caption(text)) == attribute
        seen.add(attribute)
    assert seen == set(shapes.WRONG_ATTRIBUTES)


def test_preference_samples_match_their_scene_and_stay_deterministic(tmp_path, template, collator, helpers):
    for index in range(40):
        sample = shapes.make_sample("preference", seed=3, split="train", index=index)
        meta = sample["json"]
        true = [(s["size"], s["colour"], s["kind"]) for s in meta["scene"]["shapes"]]
        assert set(sample) == {"__key__", "0.png", "json"} and shapes.parse_caption(meta["chosen"]) == true
        assert changed_attribute(true, shapes.parse_caption(meta["rejected"])) == meta["wrong"]
        assert meta["messages"] == [{"role": "user", "content": [{"type": "image"}]}]
    args = ["shapes", "--train", "5", "--val", "2", "--seed", "3", "--workers", "0", "--variants", "preference",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0 and main([*args, "--out", str(tmp_path / "b")]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["manifest.json", "preference/train-000000.tar", "preference/val-000000.tar"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    stored = next(iter(_read_tar(tmp_path / "a/preference/train-000000.tar").values()))
    assert json.loads(stored["json"]) == shapes.make_sample("preference", seed=3, split="train", index=0)["json"]
    config = PipelineConfig([str(tmp_path / "a/preference/train-000000.tar")], batch_size=5, shuffle=False)
    (batch,) = build_pipeline(config, template, transform=helpers.to_tensor, collator=collator)
    assert batch.pairs == 5 and batch.input_ids.shape[0] == 10 and batch.image_sample_index.tolist() == list(range(5))


def _read_tar(path):
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


# --- from-preference ---------------------------------------------------------------------------

def _png(path, colour):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


IMAGE_PART, TEXT = {"type": "image"}, lambda t: {"type": "text", "text": t}
RECORDS = [  # (record, expected messages or skip reason)
    ({"id": "str", "image": "red.png", "prompt": "<image>\nWhat is <|eot_id|>?", "chosen": "Red.", "rejected": "Blue."},
     [{"role": "user", "content": [IMAGE_PART, TEXT("What is <|eot_id|>?")]}]),
    ({"id": "llava", "image": "red.png", "chosen": "Red.", "rejected": "Blue.", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Its colour?"}]},
     [{"role": "user", "content": [IMAGE_PART, TEXT("What is it?")]}, {"role": "assistant", "content": "A square."},
      {"role": "user", "content": "Its colour?"}]),
    ({"id": "chat", "images": ["red.png", "blue.png"], "chosen": "Red.", "rejected": "Blue.", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [IMAGE_PART, TEXT("Left?"), IMAGE_PART]}]},
     [{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [IMAGE_PART, TEXT("Left?"), IMAGE_PART]}]),
    ({"id": "trl", "images": ["red.png"],
      "prompt": [{"role": "user", "content": [{"type": "image", "image": None}, TEXT("What is it?")]}],
      "chosen": [{"role": "assistant", "content": [TEXT("A square.")]}],
      "rejected": [{"role": "assistant", "content": "A circle."}]},
     [{"role": "user", "content": [IMAGE_PART, TEXT("What is it?")]}]),
    ({"idx": "rlaif", "image": "red.png", "question": "What is shown?",
      "chosen": "A red square.", "rejected": "A red circle."},
     [{"role": "user", "content": [IMAGE_PART, TEXT("What is shown?")]}]),
    ({"id": "implicit", "image": "blue.png",
      "chosen": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Blue."}],
      "rejected": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}]},
     [{"role": "user", "content": [IMAGE_PART, TEXT("What?")]}]),
    ({"id": "same", "image": "red.png", "prompt": "<image>", "chosen": "Red.", "rejected": "Red."},
     "identical answers"),
    ({"id": "norejected", "image": "red.png", "prompt": "<image>", "chosen": "Red."}, "missing answer"),
    ({"id": "noassistant", "prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."},
     "missing answer"),
    ({"id": "markers", "image": "red.png", "prompt": "<image> and <image>", "chosen": "A.", "rejected": "B."},
     "image marker mismatch"),
    ({"id": "endsgpt", "chosen": "A.", "rejected": "B.", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "prompt does not end with a user turn"),
    ({"id": "role", "chosen": "A.", "rejected": "B.", "messages": [{"role": "robot", "content": "Q"}]}, "unknown role"),
    ({"id": "noprompt", "image": "red.png", "chosen": "A.", "rejected": "B."}, "missing prompt"),
    ({"id": "noimage", "image": "gone.png", "prompt": "<image>", "chosen": "A.", "rejected": "B."}, "missing image"),
    (["not", "a", "record"], "bad record"),
]


@pytest.fixture
def preference_json(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "red.png", (255, 0, 0))
    _png(images / "blue.png", (0, 0, 255))
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([record for record, _ in RECORDS]))
    return path, images


def test_convert_every_layout_and_count_bad_records(preference_json, tmp_path, template, tokenizer):
    path, images = preference_json
    summary = convert_preference(path, images, tmp_path / "out", progress=False)
    good = {record.get("id", record.get("idx")): (record, expected) for record, expected in RECORDS[:6]}
    bad = [expected for _, expected in RECORDS[6:]]
    assert summary.written == len(good) and summary.splits == {"train": len(good)}
    assert summary.skipped == {reason: bad.count(reason) for reason in bad}
    assert summary.examples["identical answers"] == ["same"] and summary.examples["bad record"] == ["14"]
    stored = _read_tar(tmp_path / "out/train-000000.tar")
    assert list(stored) == list(good)
    for key, (record, messages) in good.items():
        meta = json.loads(stored[key]["json"])
        assert meta["messages"] == messages, key
        assert set(stored[key]) == {"json", *(f"{i}.png" for i in range(len(record.get("images", [0]))))}
        encoded = encode_sample(decode_sample({"__key__": key, **stored[key]}), template)  # every pair encodes
        assert isinstance(encoded, EncodedPreference) and encoded.chosen_ids != encoded.rejected_ids
    assert json.loads(stored["trl"]["json"])["chosen"] == "A square."
    # Text that spells a special token stays text: the prompt's only <|eot_id|> closes the user turn.
    encoded = encode_sample(decode_sample({"__key__": "str", **stored["str"]}), template)
    prompt = encoded.chosen_ids[: next(i for i, label in enumerate(encoded.chosen_labels) if label != X)]
    spelled = tokenizer.encode("What is <|eot_id|>?")
    assert prompt.count(tokenizer.eot_id) == 1 and tokenizer.eot_id not in spelled
    assert any(prompt[i:i + len(spelled)] == spelled for i in range(len(prompt)))


def test_cli_from_preference_splits_summary_and_strict(preference_json, tmp_path, capsys):
    path, _ = preference_json
    out = tmp_path / "cli"
    # --images defaults to the JSON's folder, where no image is: not one usable record, exit 2.
    assert main(["from-preference", "--json", str(path), "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "missing image: 7" in captured.out and "no usable record found" in captured.err
    assert main(["from-preference", "--json", str(path), "--images", str(path.parent / "images"), "--out", str(out),
                 "--val-fraction", "0.5", "--no-progress", "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "wrote 6 samples" in text and "train:" in text and "val:" in text
    assert "skipped 9 inputs:" in text and "identical answers: 1 (e.g. same)" in text
    assert len(list(out.glob("train-*.tar"))) == 1 and len(list(out.glob("val-*.tar"))) == 1
    assert main(["from-preference", "--json", str(path), "--images", str(path.parent / "images"),
                 "--out", str(tmp_path / "strict"), "--handler", "strict", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "vlm data from-preference: error: record 'same': identical answers" in err
