"""A plain Llama decoder: RMSNorm pre-norm, grouped-query attention, SwiGLU, RoPE, KV cache.

Parameter names follow Meta's layout (`tok_embeddings`, `layers.N.attention.wq`, ...), so that
`vlm.checkpoints` maps them to Hugging Face names one-to-one. The pieces (`tok_embeddings`,
`layers`, `norm`, `output`, `context`) are public because `vlm.model` runs the fusion loop over
them; `Llama.forward` is that loop without fusion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlm.text.loss import fused_linear_cross_entropy, shift_labels
from vlm.text.moe import Experts, MoEConfig, MoEFeedForward
from vlm.text.rope import AnyRopeScaling, RotaryTables, apply_rope, rope_scaling_from_dict

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # an older torch: packed rows use the boolean-mask SDPA path
    BlockMask = create_block_mask = flex_attention = None

PACKED_KERNELS = ("auto", "compiled", "flex", "sdpa", "segments")


@dataclass
class LlamaConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    vocab_size: int = 32000
    hidden_dim: int = 768  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: AnyRopeScaling | None = None  # vlm.text.rope: {type: linear | dynamic | yarn | llama3, ...}
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    dropout: float = 0.0  # residual dropout in training (see DecoderLayer); 0 = none
    moe: MoEConfig | None = None  # Mixture-of-Experts feed-forwards (vlm.text.moe); None = all dense

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.rope_scaling = rope_scaling_from_dict(self.rope_scaling)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head size dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("LlamaConfig.norm_eps and rope_theta must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LlamaConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, values: dict) -> LlamaConfig:
        """Build from a dict, refusing keys that are not fields (a typo is an error, not a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference does, then cast back before the weight.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Keys and values of one attention layer, [B, kv_heads, max_len, head_dim], allocated once at
    the first write (so the head count is the layer's own, also when tensor parallelism splits it)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, hd] at `start`; return everything written so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Cache:
    """The decoding state of a whole model: one KVCache per layer, how many positions are filled,
    which of them are padding, and the next RoPE position of each row (left padding shifts it)."""

    def __init__(self, layers: list[KVCache], batch_size: int, max_len: int, device: torch.device) -> None:
        self.layers = layers
        self.length = 0
        self.max_len = max_len
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from row `rows[i]` [B] (beam search: each beam takes its parent's keys,
        values, padding and positions). Only the filled positions are copied."""
        self.key_mask = self.key_mask[rows]
        self.next_position = self.next_position[rows]
        for layer in self.layers:
            if layer.k is not None:
                layer.k[:, :, : self.length] = layer.k[rows, :, : self.length]
                layer.v[:, :, : self.length] = layer.v[rows, :, : self.length]


@dataclass
class StepContext:
    """What every decoder layer needs for one forward call, computed once per call."""

    cos: torch.Tensor  # [B, T, head_dim]
    sin: torch.Tensor
    mask: torch.Tensor | None  # bool [B, 1, T, S], True = may attend; None with is_causal or block_mask
    is_causal: bool
    cache: Cache | None = None
    start: int = 0  # where this call's keys go in the cache
    block_mask: BlockMask | None = None  # packed rows on the FlexAttention kernel (then mask is None)
    segments: list[list[int]] | None = None  # packed rows on the per-sample kernel: each row's sample bounds
    extras: dict = field(default_factory=dict)  # room for fusions (e.g. cross-attention caches)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, *, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.layer_idx = layer_idx
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the projections' outputs: tensor parallelism gives each rank a slice.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.layers[self.layer_idx].update(ctx.start, k, v)
        if ctx.block_mask is not None:  # packed rows: blocks across samples are skipped
            out = flex_attention(q, k, v, block_mask=ctx.block_mask, enable_gqa=k.shape[1] != q.shape[1])
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))
        if k.shape[1] != q.shape[1] and T == 1 and not ctx.is_causal:
            # Decoding: each kv head's group of query heads become its rows, so the cache is read in
            # place rather than repeated; the mask [B, 1, 1, S] (or none) broadcasts over the rows.
            out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, self.head_dim), k, v, attn_mask=ctx.mask)
            return self.wo(out.reshape(B, T, -1))
        if k.shape[1] != q.shape[1]:
            # Expanding the few kv heads is faster on CPU than SDPA's enable_gqa path.
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if ctx.segments is not None:
            out = _per_sample_attention(q, k, v, ctx.segments)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def feed_forward(config: LlamaConfig, layer_idx: int) -> nn.Module:
    """The dense SwiGLU, or an MoE feed-forward where `config.moe` makes layer `layer_idx` one."""
    moe = config.moe
    if moe is None or not moe.is_moe_layer(layer_idx):
        return FeedForward(config.dim, config.hidden_dim)
    hidden = moe.expert_hidden_dim or config.hidden_dim
    shared = FeedForward(config.dim, hidden * moe.shared_experts) if moe.shared_experts else None
    return MoEFeedForward(config.dim, moe, hidden_dim=hidden, shared=shared)


class DecoderLayer(nn.Module):
    """Pre-norm block: h + drop(attention(norm(h))), then h + drop(feed_forward(norm(h))).

    `config.dropout` is residual dropout as in GPT-2: on the attention output (after `wo`) and on
    the feed-forward output (after `w2`), just before each is added to the residual stream; not on
    the token embeddings, nor inside attention. It acts only in `train()` mode and holds no
    parameters. Under tensor parallelism it drops the all-reduced (replicated) outputs of `wo` and
    `w2`, so the ranks of a tensor-parallel group need the same RNG state (the same seed).
    """

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads, layer_idx=layer_idx)
        self.feed_forward = feed_forward(config, layer_idx)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.residual_dropout = nn.Dropout(config.dropout)  # stateless: used for both branches

    def forward(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = h + self.residual_dropout(self.attention(self.attention_norm(h), ctx))
        return h + self.residual_dropout(self.feed_forward(self.ffn_norm(h)))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.packed_attention = "auto"  # kernel for packed rows: "auto" | "flex" | "sdpa" (see packed_context)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, unit norms: the usual initialisation for training from scratch."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Experts):
                module.reset_parameters(std)

    def new_cache(self, batch_size: int, max_len: int) -> Cache:
        """A KV cache for `batch_size` rows of up to `max_len` positions (memory taken at first use)."""
        layers = [KVCache(max_len) for _ in range(self.config.n_layers)]
        return Cache(layers, batch_size, max_len, self.tok_embeddings.weight.device)

    def context(
        self, seq_len: int, *, attention_mask: torch.Tensor | None = None, cache: Cache | None = None, batch_size: int = 1,
        sample_ids: torch.Tensor | None = None,
    ) -> StepContext:
        """Positions, RoPE tables and the attention mask for `seq_len` new tokens.

        `attention_mask` [B, T] marks the new tokens: 1 real, 0 padding. With a cache, this call
        reserves the next `seq_len` cache slots, so build exactly one context per forward call.
        `sample_ids` [B, T] marks packed rows (1, 2, ... per sample, 0 = padding; it implies the
        attention mask): each token attends causally within its own sample and positions restart
        at 0 per sample (see `packed_context`). The mask is built from tensors only (no host sync);
        the `is_causal` path is taken only when neither a mask, a cache nor sample ids are given.
        """
        if sample_ids is not None:
            if cache is not None:
                raise ValueError("packed rows (sample_ids) are for training and scoring; decode with one sample per row")
            return self.packed_context(sample_ids)
        device, dtype = self.tok_embeddings.weight.device, self.tok_embeddings.weight.dtype
        if attention_mask is not None:
            batch_size = attention_mask.shape[0]
            real = attention_mask.bool()
        else:
            real = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        start = cache.length if cache is not None else 0
        offset = cache.next_position[:, None] if cache is not None else 0
        # Padding does not advance positions: the first real token of each row is at position 0.
        positions = (offset + real.long().cumsum(-1) - 1).clamp_min(0)
        cos, sin = self._rotary()(positions, dtype, limit=start + seq_len)  # positions < start + seq_len
        if cache is None and attention_mask is None:
            return StepContext(cos=cos, sin=sin, mask=None, is_causal=True)  # plain causal: the fastest SDPA path
        if cache is not None:
            if start + seq_len > cache.max_len:
                raise RuntimeError(f"KV cache overflow: {start + seq_len} positions needed, {cache.max_len} allocated")
            cache.key_mask[:, start : start + seq_len] = real
            cache.next_position += real.long().sum(-1)
            cache.length = start + seq_len
            keys_real = cache.key_mask[:, : start + seq_len]
        else:
            keys_real = real
        mask = self._attention_mask(seq_len, start, keys_real)
        return StepContext(cos=cos, sin=sin, mask=mask, is_causal=False, cache=cache, start=start)

    @staticmethod
    def _attention_mask(seq_len: int, start: int, keys_real: torch.Tensor) -> torch.Tensor:
        """bool [B, 1, T, S]: query start + t sees key s when s <= start + t and s is real."""
        total = keys_real.shape[1]
        query_pos = torch.arange(start, start + seq_len, device=keys_real.device)
        key_pos = torch.arange(total, device=keys_real.device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [T, S]
        # A padding query would see no key at all (NaN rows); let it see itself, its output is unused.
        allowed = causal[None] & (keys_real[:, None, :] | (key_pos[None, :] == query_pos[:, None])[None])
        return allowed[:, None]  # [B, 1, T, S]

    def packed_context(self, sample_ids: torch.Tensor) -> StepContext:
        """The context of packed rows, sample_ids [B, T] (1, 2, ... per sample, 0 = padding), each
        sample's tokens contiguous: a block-diagonal causal mask and positions restarting per sample.

        The kernel is `self.packed_attention`: "flex" (FlexAttention with a block mask that skips
        the blocks across samples; meant for a compiled model; no backward on CPU), "sdpa" (a
        boolean mask [B, 1, T, T]: every row pays T x T), "segments" (causal SDPA per sample, cost
        the sum of the samples' squares; reads the bounds on the host, so not for compiled models),
        "compiled": flex on CUDA, sdpa elsewhere (no host read, nothing that changes with the packing
        layout: what compiled blocks need), or "auto": flex on CUDA, sdpa while compiling on CPU,
        else segments. Padding tokens form one more sample, unused."""
        weight = self.tok_embeddings.weight
        T = sample_ids.shape[1]
        index = torch.arange(T, device=sample_ids.device)
        cos, sin = self._rotary()(index - sample_starts(sample_ids), weight.dtype, limit=T)
        kernel = self._packed_kernel(weight.device)
        if kernel == "flex":
            return StepContext(cos=cos, sin=sin, mask=None, is_causal=False, block_mask=_block_mask(sample_ids))
        if kernel == "segments":
            return StepContext(cos=cos, sin=sin, mask=None, is_causal=False, segments=_sample_bounds(sample_ids))
        same = sample_ids[:, :, None] == sample_ids[:, None, :]  # [B, T, T]
        return StepContext(cos=cos, sin=sin, mask=(same & (index[None, :] <= index[:, None]))[:, None], is_causal=False)

    def _packed_kernel(self, device: torch.device) -> str:
        kernel = self.packed_attention
        if kernel not in PACKED_KERNELS:
            raise ValueError(f"Llama.packed_attention must be one of {PACKED_KERNELS}, got {kernel!r}")
        if kernel in ("auto", "compiled"):
            if device.type == "cuda" and flex_attention is not None:
                return "flex"
            return "sdpa" if kernel == "compiled" or torch.compiler.is_compiling() else "segments"
        if kernel == "flex" and flex_attention is None:
            raise ValueError("Llama.packed_attention 'flex': this torch build has no torch.nn.attention.flex_attention")
        return kernel

    def _rotary(self) -> RotaryTables:
        # Built on first use rather than kept as a buffer, so meta-device construction and
        # checkpoint loading never have to restore it.
        cached = getattr(self, "_rotary_cache", None)
        if cached is None:
            c = self.config
            cached = RotaryTables(c.head_dim, c.rope_theta, c.rope_scaling, max_seq_len=c.max_seq_len)
            self._rotary_cache = cached
        return cached

    def hidden(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> final normalised hidden states [B, T, dim] (`sample_ids`: see `context`)."""
        B, T = input_ids.shape
        ctx = self.context(T, attention_mask=attention_mask, cache=cache, batch_size=B, sample_ids=sample_ids)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)

    def forward(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size]."""
        return self.output(self.hidden(input_ids, attention_mask=attention_mask, cache=cache, sample_ids=sample_ids))

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy: position t predicts labels[t+1]; -100 labels are ignored.

        Never materialises the full logits (see `vlm.text.loss`, also for `label_smoothing`)."""
        h = self.hidden(input_ids, attention_mask=attention_mask, sample_ids=sample_ids)
        return fused_linear_cross_entropy(h, self.output.weight, shift_labels(labels), label_smoothing=label_smoothing)


def sample_starts(sample_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] the index where each token's sample starts, for packed rows sample_ids [B, T] whose
    samples are contiguous runs of one id (padding, id 0, is a run too)."""
    index = torch.arange(sample_ids.shape[1], device=sample_ids.device)
    starts = torch.ones_like(sample_ids, dtype=torch.bool)
    starts[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]  # [B, T] the first token of each run
    return torch.where(starts, index, 0).cummax(-1).values


def _block_mask(sample_ids: torch.Tensor) -> BlockMask:
    """FlexAttention's block mask for packed rows [B, T]: causal within each sample (padding included)."""

    def same_sample_causal(b, h, q, kv):
        return (sample_ids[b, q] == sample_ids[b, kv]) & (kv <= q)

    B, T = sample_ids.shape
    return create_block_mask(same_sample_causal, B, None, T, T, device=sample_ids.device)


def _sample_bounds(sample_ids: torch.Tensor) -> list[list[int]]:
    """Per row, where its samples (and its padding) start, then T: [0, s1, s2, ..., T] (read on the host)."""
    T = sample_ids.shape[1]
    change = (sample_ids[:, 1:] != sample_ids[:, :-1]).cpu()  # [B, T - 1]
    return [[0, *(change[row].nonzero().flatten() + 1).tolist(), T] for row in range(sample_ids.shape[0])]


def _per_sample_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[list[int]]) -> torch.Tensor:
    """Causal attention within each [start, end) of each row: q, k, v [B, H, T, hd] -> [B, H, T, hd]."""
    rows = []
    for row, edges in enumerate(bounds):
        parts = [F.scaled_dot_product_attention(q[row, :, a:b], k[row, :, a:b], v[row, :, a:b], is_causal=True)
                 for a, b in zip(edges[:-1], edges[1:])]
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows)
