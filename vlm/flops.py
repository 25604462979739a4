"""Model FLOPs of a VisionLanguageModel step, for MFU: every matrix product, attention included.

Conventions (those of PaLM's MFU and torchtitan): a product of [m, k] and [k, n] is 2mkn FLOPs;
attention scores and the weighted sum are counted over the full T x S square even when causal
(what `torch.utils.flop_counter` counts for SDPA, and what MFU figures are quoted with); a
training step is 3x the forward (backward = 2x). Element-wise work (norms, activations, softmax,
RoPE) and embedding lookups count 0. The output head counts whether or not it is tied to the
embedding: tying shares the weight, not the product.

The text model and the fusion are counted from their configs; the vision tower, whose structure
depends on its library (timm, open_clip, ...), is counted once per image with
`torch.utils.flop_counter.FlopCounterMode` on the tower itself (before the tower is compiled:
compiled code does not run under a dispatch mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm.text.llama import LlamaConfig


@dataclass(frozen=True)
class StepShape:
    """What a step computes on: `batch_size` rows of `seq_len` text positions (image tokens
    included), `images` in all, at most `images_per_row` in a row (Flamingo's media width), and
    the output head on `head_positions` positions (default: all; the fused loss skips ignored ones)."""

    batch_size: int
    seq_len: int
    images: int = 0
    images_per_row: int = 0
    head_positions: int | None = None


@dataclass
class Flops:
    """Forward FLOPs by part ("text/attention", "vision", ...); `train` is 3x their sum."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def forward(self) -> float:
        return float(sum(self.parts.values()))

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def linear(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def attention(queries: int, keys: int, heads: int, head_dim: int) -> float:
    """Scores q k^T and the weighted sum of values, per sequence."""
    return 2 * 2.0 * queries * keys * heads * head_dim


def text_flops(config: LlamaConfig, shape: StepShape) -> dict[str, float]:
    """The Llama (dense or MoE feed-forwards) on `shape`, by part."""
    c, B, T = config, shape.batch_size, shape.seq_len
    tokens, hd = B * T, c.head_dim
    projections = linear(tokens, c.dim, (c.n_heads + 2 * c.n_kv_heads) * hd) + linear(tokens, c.n_heads * hd, c.dim)
    parts = {"text/projections": c.n_layers * projections,
             "text/attention": c.n_layers * B * attention(T, T, c.n_heads, hd),
             "text/feed_forward": 0.0}
    for layer in range(c.n_layers):
        parts["text/feed_forward"] += _feed_forward(c, layer, tokens)
    head_positions = tokens if shape.head_positions is None else shape.head_positions
    parts["text/head"] = linear(head_positions, c.dim, c.vocab_size)
    return parts


def _feed_forward(c: LlamaConfig, layer: int, tokens: int) -> float:
    """SwiGLU: three products; an MoE layer: the router, top_k experts per token, shared experts."""
    moe = c.moe
    if moe is None or not moe.is_moe_layer(layer):
        return 3 * linear(tokens, c.dim, c.hidden_dim)
    hidden = moe.expert_hidden_dim or c.hidden_dim
    routed = moe.top_k * 3 * linear(tokens, c.dim, hidden)
    shared = 3 * linear(tokens, c.dim, hidden * moe.shared_experts) if moe.shared_experts else 0.0
    return linear(tokens, c.dim, moe.num_experts) + routed + shared


def vision_flops_per_image(vision: nn.Module) -> float:
    """The tower's forward FLOPs on one image, counted by torch's FlopCounterMode."""
    parameter = next(vision.parameters())
    pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, device=parameter.device, dtype=torch.float32)
    return count_flops(vision, lambda: vision(pixels))


def count_flops(module: nn.Module, run: Callable[[], object]) -> float:
    """FLOPs of the matrix products `run()` performs with `module`, by torch's FlopCounterMode.
    SDPA runs as its math decomposition (batched products the counter sees): the counter has no
    formula for some fused kernels (the CPU flash kernel), which it would count as 0. The
    parameters stop requiring gradients meanwhile (the counter's module tracker fails on views of
    them made under no_grad)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    trained = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in trained:
            p.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run()
    finally:
        for p in trained:
            p.requires_grad_(True)
    return float(counter.get_total_flops())


def llava_flops(fusion: nn.Module, shape: StepShape) -> dict[str, float]:
    """The projector on every image token (its Linears, in order)."""
    tokens = shape.images * fusion.vision_tokens
    return {"fusion/projector": sum(linear(tokens, m.in_features, m.out_features)
                                    for m in fusion.projector.modules() if isinstance(m, nn.Linear))}


def flamingo_flops(fusion: nn.Module, text: LlamaConfig, shape: StepShape) -> dict[str, float]:
    """The Perceiver resampler per image, and the gated cross-attention blocks over each row's
    media (`images_per_row` x latents keys; none without images)."""
    o = fusion.options
    dim = fusion.resampler.latents.shape[1]  # the tower's width
    latents, features = o.num_latents, fusion.resampler.token_pos.shape[0]
    inner = o.resampler_heads * o.resampler_head_dim
    per_layer = (linear(latents, dim, inner) + linear(features + latents, dim, 2 * inner)
                 + attention(latents, features + latents, o.resampler_heads, o.resampler_head_dim)
                 + linear(latents, inner, dim) + 2 * linear(latents, dim, dim * o.ff_mult))
    parts = {"fusion/resampler": shape.images * o.resampler_depth * per_layer}
    if shape.images == 0:
        return parts
    B, T, keys = shape.batch_size, shape.seq_len, shape.images_per_row * latents
    inner = o.cross_attn_heads * o.cross_attn_head_dim
    per_block = (linear(B * T, text.dim, inner) + linear(B * keys, dim, 2 * inner)
                 + B * attention(T, keys, o.cross_attn_heads, o.cross_attn_head_dim)
                 + linear(B * T, inner, text.dim) + 2 * linear(B * T, text.dim, text.dim * o.ff_mult))
    parts["fusion/cross_attention"] = len(fusion.blocks) * per_block
    return parts


def model_flops(model: nn.Module, shape: StepShape, *, vision_per_image: float | None = None) -> Flops:
    """Forward FLOPs of a VisionLanguageModel on `shape` (`vision_per_image`: reuse an earlier count
    of the tower, which otherwise runs once on a blank image)."""
    parts = text_flops(model.text.config, shape)
    name = model.config.fusion.name
    if shape.images:
        per_image = vision_flops_per_image(model.vision) if vision_per_image is None else vision_per_image
        parts["vision"] = shape.images * per_image
    if name == "llava":
        parts.update(llava_flops(model.fusion, shape))
    elif name == "flamingo":
        parts.update(flamingo_flops(model.fusion, model.text.config, shape))
    else:
        raise ValueError(f"no FLOP count for fusion {name!r} (vlm.flops knows llava and flamingo)")
    return Flops(parts)
