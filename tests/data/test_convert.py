"""Converters (COCO, LLaVA, folder) on fixtures written here, read back with tarfile; CLI calls."""

import errno
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vlm.data import convert
from vlm.data.cli import main


def _image(path, fmt="JPEG", colour=(200, 30, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _read(out, prefix="train"):
    """[(member name, bytes)] over all shards in order; JSON members parsed."""
    members = []
    for shard in sorted(out.glob(f"{prefix}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                members.append((m.name, json.loads(data) if m.name.endswith("json") else data))
    return members


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    jpg = _image(images / "000000000001.jpg")
    png = _image(images / "000000000002.png", "PNG")
    _image(images / "000000000005.jpg")
    (images / "000000000004.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.{'png' if i == 2 else 'jpg'}"} for i in range(1, 6)],
        "annotations": [
            {"image_id": 1, "id": 11, "caption": "A red square. \n"},
            {"image_id": 2, "id": 21, "caption": "A red PNG."},
            {"image_id": 1, "id": 12, "caption": "Something red."},
            {"image_id": 3, "id": 31, "caption": "Its file is missing."},
            {"image_id": 4, "id": 41, "caption": "Its file is corrupt."},
            {"image_id": 99, "id": 991, "caption": "No such image."},
            {"image_id": 2, "id": 22, "caption": " \n"},
        ]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    return tmp_path, jpg, png


def test_coco_per_caption(coco):
    root, jpg, png = coco
    summary = convert.convert_coco(root / "captions.json", root / "images", root / "out", progress=False)
    assert _read(root / "out") == [
        ("000000000001_11.jpg", jpg), ("000000000001_11.txt", b"A red square."),
        ("000000000001_11.json", {"caption": "A red square.", "image_id": 1, "id": 11}),
        ("000000000001_12.jpg", jpg), ("000000000001_12.txt", b"Something red."),
        ("000000000001_12.json", {"caption": "Something red.", "image_id": 1, "id": 12}),
        ("000000000002_21.png", png), ("000000000002_21.txt", b"A red PNG."),
        ("000000000002_21.json", {"caption": "A red PNG.", "image_id": 2, "id": 21}),
    ]
    assert summary.written == 3
    assert summary.skipped == {"unknown image id": 1, "missing image": 1, "corrupt image": 1,
                               "no caption": 1, "empty caption": 1}
    assert summary.examples["empty caption"] == ["000000000002_22"]
    assert summary.examples["missing image"] == ["000000000003_31"]


def test_coco_per_image_and_cli(coco, capsys):
    root, jpg, _ = coco
    args = ["from-coco", "--captions", str(root / "captions.json"), "--images", str(root / "images"),
            "--out", str(root / "out"), "--per", "image", "--shard-size", "1", "--split", "val",
            "--no-progress"]
    assert main(args) == 0
    assert [p.name for p in sorted((root / "out").iterdir())] == ["val-000000.tar", "val-000001.tar"]
    members = _read(root / "out", "val")
    assert members[:3] == [
        ("000000000001.jpg", jpg), ("000000000001.txt", b"A red square."),
        ("000000000001.json", {"caption": "A red square.", "captions": ["A red square.", "Something red."],
                               "image_id": 1})]
    assert [name for name, _ in members[3:]] == ["000000000002.png", "000000000002.txt", "000000000002.json"]
    out = capsys.readouterr().out
    assert "wrote 2 samples in 2 shards" in out and "corrupt image: 1 (e.g. 000000000004)" in out
    assert f"val: 2 samples -> --data.val_shards '{root}/out/val-*.tar'" in out
    # The Python API: train-*.tar by default; the old prefix= still names a single split.
    convert.convert_coco(root / "captions.json", root / "images", root / "py", progress=False)
    convert.convert_coco(root / "captions.json", root / "images", root / "py", prefix="coco", progress=False)
    assert [p.name for p in sorted((root / "py").iterdir())] == ["coco-000000.tar", "train-000000.tar"]


def test_bad_input_json_names_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(convert.InputError, match="broken.json"):
        convert.convert_llava(bad, tmp_path, tmp_path / "out", progress=False)
    for args, named in [(["from-coco", "--captions", str(bad), "--images", str(tmp_path)], "broken.json"),
                        (["from-llava", "--json", str(tmp_path / "gone.json")], "gone.json"),
                        (["from-coco", "--captions", str(bad), "--images", str(tmp_path / "nope")], "broken.json"),
                        (["from-folder", str(tmp_path / "nowhere")], "nowhere")]:
        assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        _assert_one_line_error(capsys.readouterr().err, named)
    (tmp_path / "dict.json").write_text('{"a": 1}')
    with pytest.raises(convert.InputError, match="dict.json: LLaVA JSON must be a list"):
        convert.convert_llava(tmp_path / "dict.json", tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(convert.InputError, match="missing.json"):
        convert.convert_coco(tmp_path / "missing.json", tmp_path, tmp_path / "out", progress=False)


def _turns(*pairs):
    return [{"from": who, "value": text} for who, text in pairs]


def test_llava(tmp_path, capsys):
    images = tmp_path / "images"
    cat = _image(images / "coco/cat.jpg")
    dog = _image(images / "dog.png", "PNG")
    _image(tmp_path / "outside.jpg")
    records = [
        {"id": "single", "image": "coco/cat.jpg",
         "conversations": _turns(("human", "<image>\nWhat is this?"), ("gpt", "A cat."))},
        {"id": "multi", "image": ["coco/cat.jpg", "dog.png"],
         "conversations": _turns(("system", "Be brief."), ("human", "Compare <image> and\n<image>\n"),
                                 ("gpt", "Same colour."), ("human", "Sure?"), ("gpt", "Yes."))},
        {"id": "mismatch", "image": "coco/cat.jpg",
         "conversations": _turns(("human", "<image> vs <image>"), ("gpt", "?"))},
        {"id": "text-only", "conversations": _turns(("human", "Hi"), ("gpt", "Hello."))},
        {"id": "gone", "image": "nope.jpg", "conversations": _turns(("human", "<image>"), ("gpt", "x"))},
        {"id": "escape", "image": "../outside.jpg", "conversations": _turns(("human", "<image>"), ("gpt", "x"))},
        {"id": "mute", "conversations": _turns(("human", "Hi"))},
        {"id": "robot", "conversations": _turns(("bot", "Hi"), ("gpt", "x"))},
        {"id": "../../evil key", "conversations": _turns(("human", "a"), ("gpt", "b"))},
        "not a record",
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    assert main(["from-llava", "--json", str(tmp_path / "llava.json"), "--images", str(images),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert _read(tmp_path / "out") == [
        ("single.0.jpg", cat),
        ("single.json", {"id": "single", "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A cat."}]}),
        ("multi.0.jpg", cat), ("multi.1.png", dog),
        ("multi.json", {"id": "multi", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " and"}, {"type": "image"}]},
            {"role": "assistant", "content": "Same colour."}, {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."}]}),
        ("text-only.json", {"id": "text-only", "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}),
        ("evil_key.json", {"id": "../../evil key", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    ]
    out = capsys.readouterr().out
    assert "wrote 4 samples" in out and "skipped 6 inputs" in out
    for reason in ["image marker mismatch: 1 (e.g. mismatch)", "missing image: 1 (e.g. gone)",
                   "image path outside images dir: 1 (e.g. escape)", "no assistant turn: 1 (e.g. mute)",
                   "unknown role: 1 (e.g. robot)", "bad record: 1 (e.g. 9)"]:
        assert reason in out


def test_folder(tmp_path, capsys):
    src = tmp_path / "src"
    a = _image(src / "a.jpg")
    (src / "a.txt").write_text("  first caption\n")
    _image(src / "c.jpg")  # no caption
    (src / "d.jpg").write_bytes(b"")  # zero bytes: corrupt
    (src / "d.txt").write_text("corrupt one")
    _image(src / "e.bmp", "BMP", colour=(1, 2, 3))
    (src / "e.txt").write_text("a bitmap")
    f = _image(src / "f.jpg", "PNG")  # PNG content under a .jpg name
    (src / "f.txt").write_text("misnamed")
    _image(src / "g.png", "PNG")
    (src / "g.txt").write_text("   ")
    b = _image(src / "sub dir/b.webp", "WEBP")
    (src / "sub dir/b.txt").write_text("nested")
    assert main(["from-folder", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    members = _read(tmp_path / "out")
    assert [name for name, _ in members] == [
        "a.jpg", "a.txt", "a.json", "e.png", "e.txt", "e.json", "f.png", "f.txt", "f.json",
        "sub_dir/b.webp", "sub_dir/b.txt", "sub_dir/b.json"]
    data = dict(members)
    assert data["a.jpg"] == a and data["a.txt"] == b"first caption" and data["a.json"] == {"caption": "first caption"}
    assert data["f.png"] == f and data["sub_dir/b.webp"] == b
    bitmap = Image.open(io.BytesIO(data["e.png"]))  # re-encoded, same pixels
    assert bitmap.format == "PNG" and bitmap.convert("RGB").getpixel((0, 0)) == (1, 2, 3)
    out = capsys.readouterr().out
    for reason in ["missing caption: 1 (e.g. c)", "corrupt image: 1 (e.g. d)", "empty caption: 1 (e.g. g)"]:
        assert reason in out


def test_image_limits(tmp_path):
    _image(tmp_path / "big.png", "PNG", size=(300, 200))
    with pytest.raises(convert.SkipSample, match="image too large"):
        convert.read_image(tmp_path / "big.png", max_pixels=300 * 200 - 1)
    assert convert.read_image(tmp_path / "big.png", max_pixels=300 * 200)[0] == "png"


def _assert_one_line_error(err, named):
    assert err.count("\n") == 1 and err.startswith("vlm data ") and named in err and "Traceback" not in err


def test_nothing_usable_is_exit_2_saying_what_was_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["from-folder", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    _assert_one_line_error(captured.err, f"{tmp_path / 'empty'}: no image with a caption file (*.jpg|*.jpeg|")
    assert "+ same-name .txt) found" in captured.err and not (tmp_path / "out").exists()
    # All skipped: still exit 2, the reasons in the error, the summary (with example keys) on stdout.
    (tmp_path / "x.jpg").write_bytes(b"junk")
    (tmp_path / "x.txt").write_text("caption")
    assert main(["from-folder", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    _assert_one_line_error(captured.err, "skipped: corrupt image 1")
    assert "corrupt image: 1 (e.g. x)" in captured.out
    with pytest.raises(convert.NoSamplesError, match="no caption with a readable image") as caught:
        (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
        convert.convert_coco(tmp_path / "coco.json", tmp_path, tmp_path / "out", progress=False)
    assert caught.value.summary.written == 0


def test_unreadable_inputs_are_counted_by_reason(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    good = _image(src / "good.jpg")
    (src / "good.txt").write_text("\ufeffkept, BOM dropped")
    for name in ["denied", "ioerror", "fifo", "latin", "captiondenied", "dangling"]:
        (src / f"{name}.txt").write_text(f"caption of {name}")
    _image(src / "denied.jpg")
    _image(src / "ioerror.png", "PNG")
    os.mkfifo(src / "fifo.jpg")  # opening it would block: never opened
    _image(src / "latin.jpg")
    (src / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    _image(src / "captiondenied.jpg")
    (src / "dangling.jpg").symlink_to(src / "gone.jpg")
    (src / "folder.jpg").mkdir()  # a folder named like an image: its caption has no image
    (src / "folder.txt").write_text("lonely")
    (src / "notes.md").write_text("not data")
    real_read_bytes = Path.read_bytes

    def read_bytes(path):  # as root, chmod 000 does not stop reads: fail them here instead
        failures = {"denied.jpg": errno.EACCES, "ioerror.png": errno.EIO, "captiondenied.txt": errno.EACCES}
        if path.name in failures:
            raise OSError(failures[path.name], os.strerror(failures[path.name]), str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert main(["from-folder", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert _read(tmp_path / "out") == [("good.jpg", good), ("good.txt", b"kept, BOM dropped"),
                                       ("good.json", {"caption": "kept, BOM dropped"})]
    out = capsys.readouterr().out
    for reason in ["unreadable image (permission denied): 1 (e.g. denied)", "unreadable image (I/O error): 1 (e.g. ioerror)",
                   "image not a regular file: 1 (e.g. fifo)", "caption not utf-8: 1 (e.g. latin)",
                   "unreadable caption (permission denied): 1 (e.g. captiondenied)",
                   "broken image symlink: 1 (e.g. dangling)", "caption without image: 1 (e.g. folder.txt)",
                   "not an image or caption: 1 (e.g. notes.md)", "skipped 8 inputs:"]:
        assert reason in out
    # COCO and LLaVA read images the same way: an I/O error is a counted skip, not a crash.
    with pytest.raises(convert.SkipSample, match=r"unreadable image \(I/O error\)"):
        convert.read_image(src / "ioerror.png")


def _inputs(kind, root):
    """A small input of each converter (12 usable samples) and the CLI arguments naming it."""
    if kind == "folder":
        for i in range(12):
            _image(root / "src" / f"img{i}.png", "PNG", colour=(i, 0, 0))
            (root / "src" / f"img{i}.txt").write_text(f"caption {i}")
        return ["from-folder", str(root / "src")]
    for i in range(6 if kind == "coco" else 12):
        _image(root / "images" / f"{i:04d}.jpg", colour=(0, i, 0))
    if kind == "coco":  # 6 images, 2 captions each
        data = {"images": [{"id": i, "file_name": f"{i:04d}.jpg"} for i in range(6)],
                "annotations": [{"image_id": i // 2, "id": i, "caption": f"caption {i}"} for i in range(12)]}
        (root / "coco.json").write_text(json.dumps(data))
        return ["from-coco", "--captions", str(root / "coco.json"), "--images", str(root / "images")]
    records = [{"id": f"r{i}", "image": f"{i:04d}.jpg",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": str(i)}]}
               for i in range(12)]
    (root / "llava.json").write_text(json.dumps(records))
    return ["from-llava", "--json", str(root / "llava.json"), "--images", str(root / "images")]


def _keys(out, split):
    return {name.split(".")[0] for name, _ in _read(out, split)}


@pytest.mark.parametrize("kind", ["coco", "llava", "folder"])
def test_split_and_val_fraction(kind, tmp_path, capsys):
    args = [*_inputs(kind, tmp_path), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "val"), "--split", "val"]) == 0
    assert [p.name for p in (tmp_path / "val").iterdir()] == ["val-000000.tar"]
    everything = _keys(tmp_path / "val", "val")
    assert len(everything) == 12
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "both"), "--val-fraction", "0.3"]) == 0
    train, val = _keys(tmp_path / "both", "train"), _keys(tmp_path / "both", "val")
    assert train and val and not train & val and train | val == everything
    out = capsys.readouterr().out
    assert f"train: {len(train)} samples -> --data.train_shards '{tmp_path}/both/train-*.tar'" in out
    assert f"val: {len(val)} samples -> --data.val_shards '{tmp_path}/both/val-*.tar'" in out
    if kind == "coco":  # split by image: both captions of an image land in the same split
        assert not {k.split("_")[0] for k in train} & {k.split("_")[0] for k in val}
    first = {p.name: p.read_bytes() for p in (tmp_path / "both").iterdir()}
    assert main([*args, "--out", str(tmp_path / "both"), "--val-fraction", "0.3"]) == 2  # exists
    assert "pass --overwrite (overwrite=True in Python)" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "both"), "--val-fraction", "0.3", "--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "both").iterdir()} == first  # same split, same bytes
    with pytest.raises(SystemExit):  # one or the other
        main([*args, "--out", str(tmp_path / "x"), "--val-fraction", "0.3", "--split", "val"])
