"""Retrieval embeddings: a vision tower's output tokens, mean-pooled and L2-normalised, so that a dot
product is a cosine similarity (`vlm.eval.baselines.embed_images`, the nearest-neighbour baseline's
features), and what identifies the tower that made them.

The tower is a model's own (`model.vision`) or any registered encoder with its weights (`Tower`,
built by `load_tower`). Vectors of different towers are not comparable: an index records the
tower's fingerprint (`vlm.features.fingerprint`: config, a hash of its weights, transform, image
size, dtype) and `check_tower` refuses a query tower whose fingerprint differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlm.data.features import _plain, _short  # the feature cache's field comparison, worded for an index
from vlm.errors import UserError
from vlm.eval.baselines import embed_images
from vlm.features import fingerprint
from vlm.vision import VisionConfig, VisionEncoder, build_vision_encoder

_PRECISIONS = {torch.bfloat16: "bf16-true", torch.float16: "16-true"}


@dataclass(frozen=True)
class TowerConfig:
    vision: VisionConfig


@dataclass
class Tower:
    """A vision tower that belongs to no model, with the two attributes retrieval reads from a model:
    `vision` (the encoder, with its `transform`) and `config.vision`."""

    vision: VisionEncoder
    config: TowerConfig


def load_tower(config: VisionConfig | Mapping[str, Any], *, device: str | torch.device | None = None) -> Tower:
    """Build a registered encoder with its weights (`checkpoint_path`, or the library's own with
    `pretrained`). Random weights are refused: no later query could be embedded by the same tower."""
    if isinstance(config, Mapping):
        config = VisionConfig.from_dict(dict(config))
    if not config.pretrained and config.checkpoint_path is None:
        raise UserError(f"encoder {config.name}:{config.model} has no weights (no checkpoint_path, pretrained "
                        "false): its random weights would never embed a query the same way; give --checkpoint PATH")
    vision = build_vision_encoder(config)
    vision.eval()
    if device is not None:
        vision.to(device)
    return Tower(vision, TowerConfig(config))


def embed(model: Any, images: Iterable[Image.Image], *, batch_size: int = 32, progress: bool = False,
          total: int | None = None) -> torch.Tensor:
    """Retrieval vectors of PIL images: [N, D] float32 on the CPU, unit rows.

    `model`: a VisionLanguageModel or a `Tower`. `images` may be a generator (one batch is held)."""
    return embed_images(model, images, batch_size=batch_size, total=total, progress=progress)


def tower_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies the vectors `model`'s tower makes (the feature cache's fingerprint, in the
    dtype of the tower's weights)."""
    weight = next(model.vision.parameters(), None)
    precision = _PRECISIONS.get(weight.dtype if weight is not None else None, "32-true")
    return fingerprint(model, precision)


def check_tower(found: Mapping[str, Any], model: Any, *, where: str) -> None:
    """UserError (one line) naming each field where the index's tower differs from `model`'s."""
    found, expected = _plain(found), _plain(tower_fingerprint(model))
    differs = [key for key in sorted(set(found) | set(expected)) if found.get(key) != expected.get(key)]
    if not differs:
        return
    details = "; ".join(f"{key}: index {_short(found.get(key))}, query tower {_short(expected.get(key))}"
                        for key in differs)
    raise UserError(f"{where} was built by another vision tower ({details}): its vectors cannot be compared with "
                    "this tower's; query with the model or encoder that built it, or build an index with this one")
