"""Flamingo-style deep fusion: a Perceiver resampler turns each image into a fixed number of
latents, and tanh-gated cross-attention blocks run before every `cross_attn_every`-th decoder layer.

Media masking: a text token sees the latents of the latest `<|image|>` at or before it
(`only_attend_immediate=True`) or of all earlier images; a token before the first image sees none
and its update is exactly zero. The gates start at 0, so an untrained model is its text model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlm.fusion.base import Fusion, FusionBatch, check_image_rows, images_per_row, register
from vlm.text.llama import sample_starts


@dataclass
class FlamingoOptions:
    cross_attn_every: int = 1
    num_latents: int = 64
    resampler_depth: int = 2
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    max_images: int = 8  # media position embeddings: the image's order within its sample
    cross_attn_heads: int = 8
    cross_attn_head_dim: int = 64
    ff_mult: int = 4
    only_attend_immediate: bool = True
    # 0 keeps the untrained model exactly its text model (right for a pretrained backbone). Training
    # from scratch stalls there: a closed gate passes almost no gradient to the image path.
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cross_attn_every", "num_latents", "resampler_depth", "resampler_heads", "resampler_head_dim",
                     "max_images", "cross_attn_heads", "cross_attn_head_dim", "ff_mult"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"flamingo option {name} must be a positive int, got {getattr(self, name)!r}")


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents]."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media [N, Nv, D], latents [N, L, D]
        latents_n = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), latents_n], dim=1)
        q = _heads(self.to_q(latents_n), self.heads)
        k, v = (_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        return self.to_out(_merge(F.scaled_dot_product_attention(q, k, v)))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, *, depth: int, num_latents: int, heads: int, head_dim: int, max_images: int, ff_mult: int,
                 num_tokens: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.media_pos = nn.Parameter(torch.zeros(max_images, dim))
        # Where each feature sits in the image. Starts at 0 (a pretrained ViT's features already
        # carry position); a tower trained from scratch learns it, which relations like "left of" need.
        self.token_pos = nn.Parameter(torch.zeros(num_tokens, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, image_order: torch.Tensor) -> torch.Tensor:
        """features [N, Nv, D], image_order [N] (0 = first image of its sample, < max_images: see
        `FlamingoFusion.check`) -> latents [N, L, D]."""
        features = features + self.media_pos[image_order][:, None] + self.token_pos
        latents = self.latents.expand(features.shape[0], -1, -1)
        for attention, ff in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(a) * xattn(x, media) then + tanh(b) * ff(x); gates a, b start at `gate_init` (0: the text model)."""

    def __init__(self, dim: int, media_dim: int, *, heads: int, head_dim: int, ff_mult: int, gate_init: float = 0.0) -> None:
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.full((1,), gate_init))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.full((1,), gate_init))

    def keys_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media [B, M*L, Dv] -> k, v [B, H, M*L, hd]."""
        k, v = self.to_kv(media).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, allowed: torch.Tensor, visible: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, T, D]; media [B, M*L, Dv]; allowed [B, 1, T, M*L] bool; visible [B, T, 1]: the token
        sees some image. `kv` reuses keys/values from an earlier call (decoding). Returns (x, kv)."""
        kv = self.keys_values(media) if kv is None else kv  # inside forward, so sharding wrappers see it
        q = _heads(self.to_q(self.norm(x)), self.heads)
        attn = self.to_out(_merge(F.scaled_dot_product_attention(q, *kv, attn_mask=allowed)))
        x = x + visible * torch.tanh(self.attn_gate) * attn
        return x + visible * torch.tanh(self.ff_gate) * self.ff(x), kv


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, S, H*hd] -> [B, H, S, hd]


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # [B, H, S, hd] -> [B, S, H*hd]


@dataclass
class FlamingoState:
    media: torch.Tensor | None  # [B, M, L, Dv] latents, zero for missing images
    media_index: torch.Tensor  # [B, T] 1-based index (in the row) of the latest image at/before each token; 0 = none
    seen: torch.Tensor  # [B] images passed so far, for the next decoding chunk
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # reused while decoding
    # Packed rows: [B, T] images of the row before each token's sample; a token sees only later ones.
    before: torch.Tensor | None = None


@register("flamingo")
class FlamingoFusion(Fusion):
    Options = FlamingoOptions

    def __init__(self, options: FlamingoOptions, *, text, vision_dim: int, vision_tokens: int, image_token_id: int) -> None:
        super().__init__(options, text=text, vision_dim=vision_dim, vision_tokens=vision_tokens, image_token_id=image_token_id)
        o = options
        self.resampler = PerceiverResampler(vision_dim, depth=o.resampler_depth, num_latents=o.num_latents, heads=o.resampler_heads,
                                            head_dim=o.resampler_head_dim, max_images=o.max_images, ff_mult=o.ff_mult,
                                            num_tokens=vision_tokens)
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(text.dim, vision_dim, heads=o.cross_attn_heads, head_dim=o.cross_attn_head_dim, ff_mult=o.ff_mult,
                                     gate_init=o.gate_init)
            for _ in range(math.ceil(text.n_layers / o.cross_attn_every))
        )

    @property
    def tokens_per_image(self) -> int:
        return 1  # the <|image|> token only marks where the image stands

    def check(self, batch: FusionBatch) -> None:
        """Refuse a batch whose rows' <|image|> tokens and images differ in number, or with a sample
        (of a packed row: each of its samples) of more than `max_images` images. Runs outside the
        compiled graph (it reads tensor values); `prepare` trusts it."""
        marks = (batch.input_ids == self.image_token_id).long()
        images = _batch_images(batch)
        check_image_rows(batch, 0 if images is None else images.shape[0])
        counts = images_per_row(batch, 0 if images is None else images.shape[0])
        if not torch.equal(marks.sum(-1), counts):
            row = int((marks.sum(-1) != counts).nonzero()[0])
            raise ValueError(f"sample {row}: {int(marks[row].sum())} <|image|> tokens but {int(counts[row])} image(s)")
        sample_ids = getattr(batch, "sample_ids", None)
        per_sample = (marks.sum(-1) if sample_ids is None  # [B] or [B, samples + 1]
                      else marks.new_zeros(marks.shape[0], marks.shape[1] + 1).scatter_add(1, sample_ids, marks))
        if marks.numel() and int(per_sample.max()) > self.options.max_images:
            raise ValueError(f"a sample has more than max_images={self.options.max_images} images")

    def prepare(self, features: torch.Tensor | None, batch: FusionBatch, state: FlamingoState | None = None) -> FlamingoState:
        marks = (batch.input_ids == self.image_token_id).long()
        if state is not None and features is None:  # a decoding step: same images, more text
            media_index = state.seen[:, None] + marks.cumsum(-1)
            return FlamingoState(state.media, media_index, media_index[:, -1], state.kv)
        media_index = marks.cumsum(-1)  # [B, T]
        sample_ids = getattr(batch, "sample_ids", None)
        before = None if sample_ids is None else (media_index - marks).gather(1, sample_starts(sample_ids))
        media = None
        if features is not None and features.shape[0] > 0:
            media = self._resample(features, batch, media_index, marks, before)
        return FlamingoState(media, media_index, media_index[:, -1], before=before)

    def prepare_blank(self, features: torch.Tensor, batch: FusionBatch) -> FlamingoState:
        # Every row gets the blank image's latents, but no token may see them: the blocks run, the
        # update is multiplied by visible = 0.
        latents = self.resampler(features, torch.zeros(1, dtype=torch.long, device=features.device))  # [1, L, Dv]
        rows = batch.input_ids.shape[0]
        media = latents[:, None].expand(rows, -1, -1, -1)  # [B, 1, L, Dv]
        zeros = torch.zeros_like(batch.input_ids)
        return FlamingoState(media, zeros, zeros[:, -1])

    def _resample(self, features: torch.Tensor, batch: FusionBatch, media_index: torch.Tensor, marks: torch.Tensor,
                  before: torch.Tensor | None) -> torch.Tensor:
        """media [B, M, L, Dv]: row b's i-th image at [b, i]; the media position embedding is the
        image's order within its sample (within its row unless packed)."""
        rows = batch.image_sample_index
        order = torch.sort(rows, stable=True).indices
        rows, features = rows[order], features[order]
        counts = torch.zeros(marks.shape[0], dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
        first = torch.cumsum(counts, 0) - counts  # index of each row's first image
        slot = torch.arange(len(rows), device=rows.device) - first[rows]  # [N] the image's order in its row
        image_order = slot if before is None else slot - _images_before(media_index, marks, before)[rows, slot]
        latents = self.resampler(features, image_order)  # [N, L, Dv]
        media = latents.new_zeros(len(counts), self._media_slots(counts, features, packed=before is not None),
                                  *latents.shape[1:])
        media[rows, slot] = latents
        return media

    def _media_slots(self, counts: torch.Tensor, features: torch.Tensor, *, packed: bool) -> int:
        """Images per row of the media tensor: the batch's most, or under compilation a bound known
        without reading tensors (max_images; every image of the batch for packed rows). Extra slots
        are zeros that no token sees."""
        if not torch.compiler.is_compiling():
            return int(counts.max())
        return features.shape[0] if packed else self.options.max_images

    def before_layer(self, index: int, h: torch.Tensor, state: FlamingoState) -> torch.Tensor:
        if state.media is None or index % self.options.cross_attn_every:
            return h
        block_index = index // self.options.cross_attn_every
        B, M, L, _ = state.media.shape
        key_image = torch.arange(1, M + 1, device=h.device).repeat_interleave(L)  # [M*L]
        current = state.media_index[..., None]  # [B, T, 1]
        before = 0 if state.before is None else state.before[..., None]  # packed: other samples' images
        allowed = key_image == current if self.options.only_attend_immediate else (key_image <= current) & (key_image > before)
        visible = current > before
        # A token that sees no image would make an all-masked softmax (NaN); let it look, then zero it.
        allowed = allowed | ~visible
        h, kv = self.blocks[block_index](h, state.media.flatten(1, 2).to(h.dtype), allowed[:, None], visible.to(h.dtype),
                                         kv=state.kv.get(block_index))
        if not torch.is_grad_enabled():  # decoding: keys/values of the images never change
            state.kv[block_index] = kv
        return h


def _batch_images(batch: FusionBatch) -> torch.Tensor | None:
    """The batch's images: pixels, or cached tower features."""
    features = getattr(batch, "image_features", None)
    return features if features is not None and features.shape[0] > 0 else getattr(batch, "pixel_values", None)


def _images_before(media_index: torch.Tensor, marks: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """[B, T + 1] where column i of row b holds how many images of row b precede the sample of the
    row's image i (built by a scatter, so no data-dependent shape). Columns past a row's images
    hold whatever the non-image tokens wrote there, unused."""
    T = marks.shape[1]
    column = torch.where(marks.bool(), media_index - 1, T)  # an image's order in its row; T = not an image
    return marks.new_zeros(marks.shape[0], T + 1).scatter_(1, column, before * marks)
