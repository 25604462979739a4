"""Emoji set: CLDR captions, byte-identical reruns, splits by base emoji, skips, missing font.

Rendering tests need Debian's fonts-noto-color-emoji and unicode-data and skip without them."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont, features

from vlm.data import emoji
from vlm.data.cli import main
from vlm.data.convert import SkipSample

_INSTALL = f"needs Debian's emoji font and names: {emoji.INSTALL}"
needs_names = pytest.mark.skipif(not emoji.DEFAULT_NAMES.is_file(),
                                 reason=f"{emoji.DEFAULT_NAMES} missing; {_INSTALL}")
needs_font = pytest.mark.skipif(not (emoji.DEFAULT_FONT.is_file() and emoji.DEFAULT_NAMES.is_file()),
                                reason=f"{emoji.DEFAULT_FONT} or {emoji.DEFAULT_NAMES} missing; {_INSTALL}")
_DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
# Code points picked from emoji-test.txt: smileys, skin tones and genders of two bases, a flag,
# a keycap and the apple.
_PICKED = ("1F600", "1F603", "1F44B", "1F44B 1F3FB", "1F44B 1F3FF", "1F9D1 200D 1F692",
           "1F468 200D 1F692", "1F469 1F3FE 200D 1F692", "1F469 1F3FB 200D 1F692", "1F1EB 1F1F7",
           "0031 FE0F 20E3", "1F34E", "1F34F", "1F352", "1F436", "1F431", "2764 FE0F", "1F680")


def _read_shards(folder: Path) -> dict[str, dict[str, dict]]:
    """{split: {key: {"png": bytes, "txt": str, "json": dict}}} from train-*.tar and val-*.tar."""
    splits: dict[str, dict[str, dict]] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                value = data if ext == "png" else json.loads(data) if ext == "json" else data.decode()
                splits.setdefault(path.name.split("-")[0], {}).setdefault(key, {})[ext] = value
    return splits


def _all_samples(splits: dict[str, dict[str, dict]]) -> dict[str, dict]:
    return {key: sample for split in splits.values() for key, sample in split.items()}


@pytest.fixture()
def names_file(tmp_path: Path) -> Path:
    """A small emoji-test.txt: the _PICKED lines of the real one, with their group headers, and
    two the font cannot draw as one glyph: a private-use code point and two apples in a row."""
    wanted, lines = set(_PICKED), []
    for line in emoji.DEFAULT_NAMES.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:") or line.split(";")[0].strip() in wanted:
            lines.append(line)
    lines += ["E000 ; fully-qualified # \ue000 E1.0 private thing",
              "1F34E 1F34E ; fully-qualified # \U0001f34e\U0001f34e E1.0 two apples"]
    path = tmp_path / "emoji-test.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_base_name_groups_skin_tones_and_genders():
    base = emoji.base_name
    assert base("woman firefighter: medium-dark skin tone") == base("man firefighter") == "firefighter"
    assert base("waving hand: dark skin tone") == "waving hand"
    assert base("man") == base("woman: red hair") == base("person: beard") == "person"
    assert base("kiss: woman, man, light skin tone") == base("kiss") == "kiss"
    assert base("women holding hands") == base("woman and man holding hands") == "holding hands"
    assert base("flag: france") != base("flag: germany")
    assert base("keycap: 1") == "keycap: 1"
    assert base("Red Apple") == "red apple"


def test_missing_font_is_one_line_error(tmp_path, capsys):
    args = ["emoji", "--out", str(tmp_path / "out"), "--font", str(tmp_path / "none.ttf"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "none.ttf not found" in err and "apt-get install fonts-noto-color-emoji" in err
    assert not (tmp_path / "out").exists()


@needs_font
def test_missing_names_is_one_line_error(tmp_path, capsys):
    args = ["emoji", "--out", str(tmp_path / "out"), "--names", str(tmp_path / "none.txt"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unicode-data" in err and "none.txt not found" in err


@needs_names
def test_names_are_lower_case_cldr_names():
    by_text = {e.text: e for e in emoji.load_emoji()}
    assert len(by_text) > 3000
    assert by_text["\U0001f34e"].name == "red apple"
    assert by_text["\U0001f469\U0001f3fe\u200d\U0001f692"].name == "woman firefighter: medium-dark skin tone"
    assert by_text["\U0001f1eb\U0001f1f7"].name == "flag: france"
    assert by_text["1\ufe0f\u20e3"].name == "keycap: 1"
    assert by_text["\U0001f34e"].group == "food & drink"
    assert all(e.name == e.name.lower() for e in by_text.values())


@needs_font
def test_deterministic(tmp_path):
    for run in ("a", "b"):
        assert main(["emoji", "--out", str(tmp_path / run), "--limit", "12", "--per-emoji", "3",
                     "--size", "32", "--seed", "5", "--val-fraction", "0.5", "--no-progress"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "train-000000.tar" in files and "manifest.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert main(["emoji", "--out", str(tmp_path / "c"), "--limit", "12", "--per-emoji", "3",
                 "--size", "32", "--seed", "6", "--val-fraction", "0.5", "--no-progress"]) == 0
    first, other = (_all_samples(_read_shards(tmp_path / run)) for run in ("a", "c"))
    assert first["1f600_1"]["png"] != other["1f600_1"]["png"]  # the seed matters
    assert first["1f600_0"]["png"] == other["1f600_0"]["png"]  # but not to the canonical view


@needs_font
@pytest.mark.skipif(not features.check("raqm"), reason="Pillow without raqm cannot join emoji sequences")
def test_shards_captions_images_split_and_skips(tmp_path, names_file, capsys):
    out = tmp_path / "out"
    assert main(["emoji", "--out", str(out), "--names", str(names_file), "--size", "48",
                 "--per-emoji", "3", "--val-fraction", "0.5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "18 of 20 emoji rendered" in printed and "not one glyph" in printed
    splits = _read_shards(out)
    samples = _all_samples(splits)
    assert len(samples) == 3 * len(_PICKED)
    captions = {key: sample["txt"] for key, sample in samples.items()}
    assert captions["1f34e_0"] == captions["1f34e_2"] == "red apple"
    assert captions["1f469-1f3fe-200d-1f692_1"] == "woman firefighter: medium-dark skin tone"
    assert captions["1f1eb-1f1f7_0"] == "flag: france" and captions["31-fe0f-20e3_0"] == "keycap: 1"
    assert all(sample["json"]["caption"] == sample["txt"] for sample in samples.values())

    # Never the same base emoji in both splits; the skin tones and genders of one base together.
    bases = {split: {s["json"]["base"] for s in split_samples.values()}
             for split, split_samples in splits.items()}
    assert bases["train"] and bases["val"] and not bases["train"] & bases["val"]
    firefighters = {split for split, split_samples in splits.items()
                    for s in split_samples.values() if s["json"]["base"] == "firefighter"}
    assert len(firefighters) == 1

    for sample in samples.values():
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "RGB" and image.size == (48, 48)
        pixels = np.asarray(image, dtype=np.float32)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20 and pixels.std() > 10  # not blank

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["emoji_listed"] == 20 and manifest["emoji_rendered"] == 18
    assert manifest["skipped"] == {"not in the font (blank glyph)": 1,
                                   "not one glyph (sequence not joined by the font)": 1}
    assert manifest["samples"] == {"train": len(splits["train"]), "val": len(splits["val"])}


@pytest.mark.skipif(not _DEJAVU.is_file(), reason=f"{_DEJAVU} missing (Debian's fonts-dejavu-core)")
def test_notdef_box_is_skipped():
    render = emoji.GlyphRenderer(ImageFont.truetype(str(_DEJAVU), emoji.BITMAP_SIZE))
    assert render("A").width > 0
    with pytest.raises(SkipSample, match="notdef"):
        render("\U0001f34e")  # DejaVu has no apple: its .notdef box would be drawn
