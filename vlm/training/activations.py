"""The activation model of `vlm memory`: bytes each part of a VisionLanguageModel keeps for the
backward pass, with and without per-block activation checkpointing (see vlm/training/memory.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from vlm.model import VisionLanguageModel
from vlm.text.loss import default_chunk_size
from vlm.training.parallel import vision_blocks

if TYPE_CHECKING:
    from vlm.training.memory import Precision


@dataclass(frozen=True)
class Shapes:
    batch_size: int  # per device
    seq_len: int  # text positions, image tokens included
    images_per_sample: int = 1


@dataclass
class Part:
    """Activation bytes of one part: `other`, and checkpointable units as (all saved, inputs)."""

    other: int = 0
    units: list[tuple[int, int]] = field(default_factory=list)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class Activations:
    """What autograd keeps for backward in one forward, per part, from the model's shapes."""

    FUSIONS = ("llava", "flamingo")  # the fusions whose activations are modeled

    def __init__(self, model: VisionLanguageModel, precision: Precision, shapes: Shapes, *, tensor_parallel: int = 1) -> None:
        self.model, self.p, self.s, self.tp = model, precision, shapes, tensor_parallel
        self.images = shapes.batch_size * shapes.images_per_sample
        self.rows = shapes.batch_size * shapes.seq_len  # text positions
        self.vision_grad = _trains(model.vision)
        text = model.text
        self.upstream = self.vision_grad or _trains(model.fusion) or text.tok_embeddings.weight.requires_grad
        self.text_grad = self.upstream or _trains(text.layers) or text.norm.weight.requires_grad

    def parts(self) -> dict[str, Part]:
        name = self.model.config.fusion.name
        fusion = getattr(self, name)() if name in self.FUSIONS else Part()
        return {"vision": self.vision(), "fusion": fusion, "text": self.text(), "loss": self.loss()}

    def linear_inputs(self, linears: Sequence[tuple[str, nn.Module]], *, src: int, saved: bool = False) -> int:
        """Bytes per row that linears reading one tensor (`src` bytes an element) keep of it;
        `saved`: another op keeps that tensor already."""
        own, shared = 0, False
        for fqn, linear in linears:
            if getattr(linear, "lora_A", None) is not None:  # a LoRALinear: B keeps A's output [rows, rank]
                own += linear.rank * self.p.compute
                if isinstance(linear.dropout, nn.Dropout) and linear.dropout.p > 0:
                    # A's own (dropped) input, and the mask: 1 byte on CUDA (native_dropout); CPU's
                    # dropout keeps it in the input's dtype (under-counted here)
                    own += linear.in_features * (self.p.compute + 1)
                    continue  # the frozen weight needs no input
            fp8 = self.p.fp8(linear, fqn)
            if not (linear.weight.requires_grad or fp8):  # the input's gradient needs only the weight
                continue
            if fp8 and self.p.fp8_recipe == "delayed":
                own += linear.in_features  # its e4m3 cast
            elif self.p.autocast and src != self.p.compute:
                own += linear.in_features * self.p.compute  # its own cast
            else:
                shared = True
        return own + (linears[0][1].in_features * src if shared and not saved else 0)

    def text(self) -> Part:
        text, p, c = self.model.text, self.p, self.model.text.config
        part = Part(other=8 * self.rows if text.tok_embeddings.weight.requires_grad else 0)  # token ids
        grad = self.upstream
        for i, layer in enumerate(text.layers):
            grad = grad or _trains(layer)
            part.units.append((self.decoder_layer(i, layer), c.dim * p.residual * self.rows) if grad else (0, 0))
        if self.text_grad:
            part.other += 2 * c.head_dim * p.residual * self.rows  # RoPE cos and sin, shared by the layers
            part.other += (4 * c.dim + 4 + (c.dim * p.residual if text.norm.weight.requires_grad else 0)) * self.rows
        return part

    def decoder_layer(self, index: int, layer: nn.Module) -> int:
        p, c = self.p, self.model.text.config
        D, F = c.dim, c.hidden_dim

        def linears(*names: str) -> list[tuple[str, nn.Module]]:
            return [(f"text.layers.{index}.{n}", layer.get_submodule(n)) for n in names]

        row = 2 * (4 * D + 4)  # each RMSNorm keeps its input (in fp32) and 1/rms
        row += sum(D * p.residual for n in (layer.attention_norm, layer.ffn_norm) if n.weight.requires_grad)
        row += self.linear_inputs(linears("attention.wq", "attention.wk", "attention.wv"), src=p.residual)
        row += self.linear_inputs(linears("feed_forward.w1", "feed_forward.w3"), src=p.residual)
        split = 4 * D * p.compute + 4 * c.n_heads  # SDPA: q, k and v (kv heads repeated), output; logsumexp
        split += self.linear_inputs(linears("attention.wo"), src=p.compute, saved=True)
        split += 3 * F * p.compute  # SwiGLU: w1 x (for silu), silu(w1 x) and w3 x (for their product)
        split += self.linear_inputs(linears("feed_forward.w2"), src=p.compute)
        return (row + split // self.tp) * self.rows  # tensor parallelism splits heads and hidden features

    def vision(self) -> Part:
        """A trained tower: pre-norm ViT blocks over all tokens (prefix tokens included)."""
        encoder, p = self.model.vision, self.p
        if not self.vision_grad:
            return Part()  # runs without autograd
        inner = getattr(encoder, "model", None) or getattr(encoder, "visual", None) or encoder
        prefix = getattr(inner, "num_prefix_tokens", 1 if hasattr(inner, "class_embedding") else 0)
        rows = self.images * (encoder.num_tokens + (0 if encoder.keep_prefix_tokens else prefix))
        cast = p.compute if p.autocast else p.residual
        part = Part(other=self.images * 3 * encoder.image_size**2 * p.compute + rows * encoder.dim * p.residual)  # patch embedding
        for block in vision_blocks(encoder):
            D = next(m for m in block.modules() if isinstance(m, nn.LayerNorm)).normalized_shape[0]
            F = max(m.in_features for m in block.modules() if isinstance(m, nn.Linear))
            heads = next((m.num_heads for m in block.modules() if hasattr(m, "num_heads")), 1)
            quick = any(type(m).__name__ == "QuickGELU" for m in block.modules())  # x * sigmoid(1.702 x) keeps one more
            row = 2 * (D * p.residual + 8) + 2 * D * cast  # two LayerNorms: inputs, statistics, outputs
            row += 4 * D * p.compute + 4 * heads  # qkv output (SDPA's q, k, v), SDPA output; logsumexp
            row += (2 + quick) * F * p.compute  # MLP hidden, before and after the activation
            part.units.append((row * rows, D * p.residual * rows))
        return part

    def llava(self) -> Part:
        """The projector over every image token, and the splice's placeholder mask."""
        fusion, p = self.model.fusion, self.p
        if not (self.vision_grad or _trains(fusion)):
            return Part()
        row, src, width = 0, p.residual, 0  # the projector reads a copy of the features (images sorted by row)
        for name, module in fusion.projector.named_children():
            if isinstance(module, nn.Linear):
                row += self.linear_inputs([(f"fusion.projector.{name}", module)], src=src)
                src, width = p.compute, module.out_features
            else:
                row += width * p.compute  # the activation keeps its input
        return Part(other=row * self.images * fusion.vision_tokens + self.rows)

    def flamingo(self) -> Part:
        fusion, p = self.model.fusion, self.p
        if not (self.upstream or _trains(fusion)):
            return Part()
        media_rows = self.images * fusion.options.num_latents  # every image's latents
        part = Part(other=media_rows * fusion.resampler.latents.shape[1] * p.residual)  # read by every block
        part.units.append(self.resampler(fusion))
        part.units += [self.cross_attention(k, block, media_rows) for k, block in enumerate(fusion.blocks)]
        return part

    def resampler(self, fusion: nn.Module) -> tuple[int, int]:
        p, o, r = self.p, fusion.options, fusion.resampler
        Dv, L, Nv = r.latents.shape[1], o.num_latents, self.model.vision.num_tokens
        inner = o.resampler_heads * o.resampler_head_dim
        per_image = Nv * Dv * p.residual  # features + media position, read by every layer's norm
        for i, (attention, ff) in enumerate(r.layers):
            fq = f"fusion.resampler.layers.{i}"
            per_image += Nv * 8 + L * ((Dv * p.residual if i else 0) + 8)  # norm inputs and statistics
            per_image += L * self.linear_inputs([(f"{fq}.0.to_q", attention.to_q)], src=p.residual)
            per_image += (Nv + L) * self.linear_inputs([(f"{fq}.0.to_kv", attention.to_kv)], src=p.residual)
            per_image += L * (2 * inner * p.compute + 4 * o.resampler_heads) + (Nv + L) * 2 * inner * p.compute  # SDPA
            per_image += L * (Dv * p.residual + 8 + o.ff_mult * Dv * p.compute)  # feed-forward norm, GELU input
            per_image += L * (self.linear_inputs([(f"{fq}.1.1", ff[1])], src=p.residual)
                              + self.linear_inputs([(f"{fq}.1.3", ff[3])], src=p.compute))
        per_image += L * (Dv * p.residual + 8)  # final norm
        return per_image * self.images, Nv * Dv * p.residual * self.images

    def cross_attention(self, index: int, block: nn.Module, media_rows: int) -> tuple[int, int]:
        p, o, D = self.p, self.model.fusion.options, self.model.text.config.dim
        inner, fq = o.cross_attn_heads * o.cross_attn_head_dim, f"fusion.blocks.{index}"
        mask = media_rows // self.s.batch_size  # bool [B, 1, T, M*L], made for every block
        row = 2 * (D * p.residual + 8) + mask  # two LayerNorms: inputs and statistics
        row += self.linear_inputs([(f"{fq}.to_q", block.to_q)], src=p.residual)
        row += 2 * inner * p.compute + 4 * o.cross_attn_heads  # SDPA: q, output; logsumexp
        row += 2 * D * p.compute if block.attn_gate.requires_grad else 0  # both branches, for the gates
        row += self.linear_inputs([(f"{fq}.ff.1", block.ff[1])], src=p.residual) + o.ff_mult * D * p.compute
        row += self.linear_inputs([(f"{fq}.ff.3", block.ff[3])], src=p.compute)
        media = self.linear_inputs([(f"{fq}.to_kv", block.to_kv)], src=p.residual, saved=True)  # own casts only
        keys = media_rows * (2 * inner * p.compute + media)  # k and v
        return row * self.rows + keys, (D * p.residual + mask) * self.rows

    def loss(self) -> Part:
        """The fused loss keeps d loss/d hidden, and the output matrix's fp32 gradient if it trains."""
        weight, p = self.model.text.output.weight, self.p
        V, D = weight.shape
        return Part(other=(self.rows * D * p.residual if self.text_grad else 0) + (V * D * 4 if weight.requires_grad else 0))

    def workspace(self) -> tuple[int, int]:
        """Transients of (the end of the forward, a decoder layer's backward). The loss: its hidden
        input, one chunk's logits and log-softmax in fp32, autocast's cast of the output matrix. The
        backward: the incoming gradient, SwiGLU's two [rows, hidden_dim] gradients beyond what it frees."""
        text, p = self.model.text, self.p
        V, D = text.output.weight.shape
        loss = self.rows * D * p.residual + min(default_chunk_size(V), self.rows) * V * 8 + (V * D * p.compute if p.autocast else 0)
        backward = self.rows * (D * p.residual + 2 * text.config.hidden_dim * p.compute // self.tp) if self.text_grad else 0
        return loss, backward


def activation_rows(activations: Activations, gradients: int) -> dict[str, tuple[int, int]]:
    """Per part (no checkpointing, checkpointing), and the peak transient beyond the other rows.

    Checkpointing keeps each unit's inputs, plus the largest unit while backward recomputes it. The
    peak is the end of the forward (the previous `gradients` still alive), or a block's backward:
    without checkpointing the last block, before new gradients exist; with it, up to the first block,
    with nearly all new gradients.
    """
    parts = activations.parts()
    largest = max(((full, name) for name, part in parts.items() for full, _ in part.units), default=(0, None))
    rows = {name: (part.other + sum(f for f, _ in part.units),
                   part.other + sum(i for _, i in part.units) + (largest[0] if name == largest[1] else 0))
            for name, part in parts.items()}
    loss, backward = activations.workspace()
    rows["peak transient"] = (max(loss, backward - gradients), max(loss - largest[0], backward))
    return rows
