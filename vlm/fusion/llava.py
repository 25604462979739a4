"""LLaVA-style early fusion: projected image features replace the `<|image|>` placeholder tokens."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from vlm.fusion.base import Fusion, FusionBatch, check_image_rows, images_per_row, num_images, register


@dataclass
class LlavaOptions:
    projector: str = "mlp2x_gelu"  # "linear" or "mlp{depth}x_gelu"

    def __post_init__(self) -> None:
        projector_depth(self.projector)


def projector_depth(name: str) -> int:
    if name == "linear":
        return 1
    if m := re.fullmatch(r"mlp(\d+)x_gelu", name):
        if int(m[1]) >= 1:
            return int(m[1])
    raise ValueError(f"unknown projector {name!r}: use 'linear' or 'mlp<depth>x_gelu' such as 'mlp2x_gelu'")


def build_projector(name: str, vision_dim: int, text_dim: int) -> nn.Sequential:
    """`linear`: one Linear. `mlpNx_gelu`: N Linears with GELU between them."""
    layers: list[nn.Module] = [nn.Linear(vision_dim, text_dim)]
    for _ in range(projector_depth(name) - 1):
        layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
    return nn.Sequential(*layers)


@dataclass
class LlavaState:
    input_ids: torch.Tensor  # [B, T] of the current call
    image_embeds: torch.Tensor | None  # [N, Nv, D]
    counts: torch.Tensor | None  # [B] images per row
    anchor: torch.Tensor | None = None  # 0-valued, ties a blank image's graph to the text (see prepare_blank)


@register("llava")
class LlavaFusion(Fusion):
    Options = LlavaOptions

    def __init__(self, options: LlavaOptions, *, text, vision_dim: int, vision_tokens: int, image_token_id: int) -> None:
        super().__init__(options, text=text, vision_dim=vision_dim, vision_tokens=vision_tokens, image_token_id=image_token_id)
        self.vision_tokens = vision_tokens
        self.projector = build_projector(options.projector, vision_dim, text.dim)

    @property
    def tokens_per_image(self) -> int:
        return self.vision_tokens

    def prepare(self, features: torch.Tensor | None, batch: FusionBatch, state: LlavaState | None = None) -> LlavaState:
        if features is None or features.shape[0] == 0:
            return LlavaState(batch.input_ids, None, None)
        counts = images_per_row(batch, features.shape[0])
        # The splice fills slots in row-major order, so images must be grouped by row (stable sort).
        order = torch.sort(batch.image_sample_index, stable=True).indices
        return LlavaState(batch.input_ids, self.projector(features[order]), counts)

    def prepare_blank(self, features: torch.Tensor, batch: FusionBatch) -> LlavaState:
        return LlavaState(batch.input_ids, None, None, anchor=self.projector(features).sum() * 0.0)

    def check(self, batch: FusionBatch) -> None:
        """Each row must hold exactly `tokens_per_image` placeholders per image of that row."""
        images = num_images(batch)
        check_image_rows(batch, images)
        counts = images_per_row(batch, images) if images else None
        found = (batch.input_ids == self.image_token_id).sum(-1)
        expected = (counts if counts is not None else torch.zeros_like(found)) * self.vision_tokens
        if not torch.equal(found, expected):
            row = int((found != expected).nonzero()[0])
            raise ValueError(
                f"sample {row}: {int(found[row])} image placeholder tokens but "
                f"{int(expected[row]) // self.vision_tokens} image(s) x {self.vision_tokens} tokens = {int(expected[row])}"
            )

    def embed(self, h: torch.Tensor, state: LlavaState) -> torch.Tensor:
        if state.anchor is not None:
            h = h + state.anchor.to(h.dtype)
        if state.image_embeds is None:
            return h
        # `check` has matched the slots to the images. They are ordered by row, then by appearance,
        # which is the row-major order of the slots.
        slots = state.input_ids == self.image_token_id  # [B, T]
        return h.masked_scatter(slots[..., None], state.image_embeds.to(h.dtype))
