"""One image-size limit (vlm.data.decode.DEFAULT_MAX_PIXELS) and one message, wherever an image is read:
`vlm caption`, `vlm evaluate`, the shard reader and the converters."""

import inspect
import io
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from vlm import caption
from vlm.cli import main as vlm_main
from vlm.data import convert, decode
from vlm.data.decode import DEFAULT_MAX_PIXELS, SampleError, decode_sample, iter_shard_samples
from vlm.data.pipeline import PipelineConfig

# 20000 x 20000 is over Pillow's own bomb limit (179 MP) too: our limit and wording must still be the ones shown
SIZES = [(20000, 20000), (5000, 4000)]


def huge_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 1-bit pixels (the data is never read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def expected_message(width: int, height: int) -> str:
    return (f"image too large: {width}x{height} image ({width * height:,} pixels) exceeds the limit of "
            f"{DEFAULT_MAX_PIXELS:,} pixels (4096x4096); downscale it")


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for member, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)



@pytest.mark.parametrize("width,height", SIZES)
def test_caption_and_reader_refuse_with_the_same_message(model_dir, tmp_path, capsys, width, height):
    image = tmp_path / "huge.png"
    image.write_bytes(huge_png(width, height))
    message = expected_message(width, height)
    # vlm caption: exit 2 (no image could be read), one line naming the file, no traceback
    assert vlm_main(["caption", "--model", str(model_dir), str(image)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"vlm caption: {image}: cannot read image: {message}\n"
    # the shard reader: the same words, then where in the shard
    shard = write_shard(tmp_path / "huge.tar", {"big": {"png": huge_png(width, height), "txt": b"a caption"}})
    with open(shard, "rb") as stream:
        (raw,) = iter_shard_samples(stream, shard, max_member_bytes=2**20)
    with pytest.raises(SampleError) as caught:
        decode_sample(raw)
    assert str(caught.value) == f"{message} (shard {shard!r}, sample 'big', member 'png')"
    assert caught.value.reason == "image too large"


def test_every_reader_defaults_to_the_one_limit(tmp_path):
    for function in (decode.decode_image, decode.decode_sample, decode.decode_member, caption.read_image):
        assert inspect.signature(function).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert PipelineConfig(["x.tar"]).max_pixels == DEFAULT_MAX_PIXELS
    # the converters: the same limit, not Pillow's own (179 MP); a 5000x4000 image is counted as too large
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png(5000, 4000))
    with pytest.raises(convert.SkipSample) as caught:
        convert.read_image(huge)
    assert caught.value.reason == "image too large"
    huge.write_bytes(huge_png(4096, 4096))  # at the limit: read, then found corrupt (the test data is bogus)
    with pytest.raises(convert.SkipSample) as caught:
        convert.read_image(huge)
    assert caught.value.reason == "corrupt image"


def test_evaluate_reports_the_same_message(model_dir, tmp_path, capsys):
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(good, "PNG")
    shard = write_shard(tmp_path / "val-000000.tar", {
        "ok": {"png": good.getvalue(), "txt": b"a red square"},
        "big": {"png": huge_png(20000, 20000), "txt": b"a huge picture"}})
    code = vlm_main(["evaluate", "--model", str(model_dir), "--data", shard, "--max-new-tokens", "2",
                     "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 0
    assert (f"vlm evaluate: skipped 1 sample(s), the first: {expected_message(20000, 20000)} "
            f"(shard {shard!r}, sample 'big', member 'png')") in err.splitlines()
