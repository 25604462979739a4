"""Fixtures for the data tests: a tiny tokenizer, a transform, and shards written with tarfile
directly (not through vlm.data.writer), so that reading is tested independently of writing."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.collate import Collator
from vlm.text.chat import ChatTemplate
from vlm.text.tokenizer import Tokenizer

IMAGE_SIZE = 8  # what the test transform resizes to
_CORPUS = """a red square above a blue circle. a green triangle left of a small yellow star.
What shape is this? It is a circle. How many shapes are there? There are two shapes.
Here is a picture of a cat. Then a second picture follows, with a dog in the garden.
user assistant system caption sample number shard
"""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """The test 'vision encoder transform': PIL -> [3, 8, 8] float in [0, 1]. Module level: picklable."""
    array = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_bytes(color: tuple[int, int, int] = (255, 0, 0), *, fmt: str = "PNG", size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive (as bytes) holding `members` (name, data) in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def members_of(samples: list[dict]) -> list[tuple[str, bytes]]:
    """Samples {"__key__": k, ext: bytes | str | dict} -> tar members "k.ext" in order."""
    members = []
    for sample in samples:
        for ext, value in sample.items():
            if ext == "__key__":
                continue
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
            if isinstance(value, str):
                value = value.encode("utf-8")
            members.append((f"{sample['__key__']}.{ext}", value))
    return members


def write_shard(path: Path, samples: list[dict], *, truncate_at: int | None = None) -> str:
    """Write samples as one tar shard; `truncate_at` cuts the file to that many bytes."""
    data = tar_bytes(members_of(samples))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if truncate_at is None else data[:truncate_at])
    return str(path)


def caption_sample(key: str, caption: str, color=(255, 0, 0)) -> dict:
    return {"__key__": key, "png": image_bytes(color), "txt": caption}


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The module's helper functions, for test files (which cannot import a conftest reliably)."""
    return SimpleNamespace(to_tensor=to_tensor, image_bytes=image_bytes, tar_bytes=tar_bytes,
                           write_shard=write_shard, caption_sample=caption_sample, image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("tokenizer") / "corpus.txt"
    corpus.write_text(_CORPUS * 4)
    return Tokenizer.train([corpus], vocab_size=400, min_frequency=2, show_progress=False)


@pytest.fixture(scope="session")
def template(tokenizer) -> ChatTemplate:
    return ChatTemplate(tokenizer)


@pytest.fixture
def collator(tokenizer) -> Collator:
    return Collator(pad_id=tokenizer.pad_id, image_id=tokenizer.image_id, image_token_count=3)


@pytest.fixture
def caption_shards(tmp_path) -> list[str]:
    """4 shards x 5 caption samples; caption "caption sample number {i}" tells them apart."""
    shards = []
    for shard in range(4):
        samples = [caption_sample(f"s{shard}_{i:03d}", f"caption sample number {shard * 5 + i}",
                                  color=(shard * 60, i * 40, 100)) for i in range(5)]
        shards.append(write_shard(tmp_path / f"train-{shard:06d}.tar", samples))
    return shards
