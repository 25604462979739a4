"""The Meta layout: `params.json` + `consolidated.*.pth`, loaded with `weights_only=True`. Its
rotary layout interleaves the two halves of each head, so q/k rows are permuted on load and save."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from vlm.checkpoints.common import _read_json, _require
from vlm.checkpoints.rope import rope_scaling_object_from_meta, rope_scaling_to_meta
from vlm.errors import UserError
from vlm.text.llama import Llama, LlamaConfig
from vlm.text.rope import RopeScaling

_META_REQUIRED = ("dim", "n_layers", "n_heads")

# Llama 3.2 text models whose params.json says `use_scaled_rope` but not the factor, keyed by
# (dim, n_layers). Llama 3.1 (8B, 70B, 405B) and the 3.2 vision models' text towers use factor 8.
_LLAMA32_TEXT_SHAPES = {(2048, 16): "Llama 3.2 1B", (3072, 28): "Llama 3.2 3B"}
_LLAMA32_ROPE_FACTOR = 32.0


def config_from_meta(
    params: dict,
    *,
    vocab_size: int | None = None,
    source: str = "params.json",
    rope_scaling_factor: float | None = None,
) -> LlamaConfig:
    """Meta's params.json derives the FFN size from `multiple_of` and `ffn_dim_multiplier`.

    The RoPE factor comes from `rope_scaling_factor` (argument, then file); a file that only says
    `use_scaled_rope` gets 32 and tied embeddings for the Llama 3.2 text shapes (with a warning), 8
    otherwise (Llama 3.1). An explicit factor enables scaling even without `use_scaled_rope`.
    A `rope_scaling` object (`{"type": "yarn", ...}`, which `save_llama_meta` writes for the methods
    Meta has no keys for) takes precedence over all of these.
    """
    _require(params, _META_REQUIRED, source)
    dim = params["dim"]
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    factor = rope_scaling_factor if rope_scaling_factor is not None else params.get("rope_scaling_factor")
    llama32 = _LLAMA32_TEXT_SHAPES.get((dim, params["n_layers"])) if params.get("use_scaled_rope") else None
    if llama32 is not None and factor is None:
        warnings.warn(
            f"{source}: use_scaled_rope without rope_scaling_factor and dim={dim}, n_layers={params['n_layers']}: "
            f"assuming {llama32} (RoPE factor {_LLAMA32_ROPE_FACTOR:g}, tied embeddings). Override with "
            "load_llama(..., rope_scaling_factor=...) or a rope_scaling_factor entry in params.json; a checkpoint "
            "whose output.weight differs from tok_embeddings.weight loads untied.",
            stacklevel=2,
        )
        factor = _LLAMA32_ROPE_FACTOR
    scaling = rope_scaling_object_from_meta(params, source=source)
    if scaling is None and (factor is not None or params.get("use_scaled_rope")):
        scaling = RopeScaling(
            factor=8.0 if factor is None else factor,
            low_freq_factor=params.get("low_freq_factor", 1.0),
            high_freq_factor=params.get("high_freq_factor", 4.0),
            original_max_position_embeddings=params.get("original_max_position_embeddings", 8192),
        )
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # Llama 2 leaves it to the tokenizer
        if vocab_size is None:
            raise ValueError(f"{source}: vocab_size is {vocab}; it must come from the weights")
        vocab = vocab_size
    return LlamaConfig(
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=vocab,
        hidden_dim=hidden,
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=scaling,
        max_seq_len=params.get("max_seq_len", 2048),
        tie_embeddings=llama32 is not None,
    )


# --- rotary permutation ----------------------------------------------------------------------


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head go from interleaved pairs (x0, x1), (x2, x3)... to two halves."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _read_meta(path: Path, *, rope_scaling_factor: float | None = None) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{path}: params.json found but no consolidated.*.pth")
    params = _read_json(path / "params.json")
    _require(params, _META_REQUIRED, str(path / "params.json"))  # before the (large) shards are read
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    state = _merge_meta_shards(shards, dim=params["dim"])
    state.pop("rope.freqs", None)  # Llama 2 stores its rotary table; we compute it
    config = config_from_meta(params, vocab_size=state["tok_embeddings.weight"].shape[0],
                              source=str(path / "params.json"), rope_scaling_factor=rope_scaling_factor)
    config = _tie_from_weights(config, state)
    for key in list(state):
        if key.endswith("attention.wq.weight"):
            state[key] = meta_to_hf_rotary(state[key], config.n_heads)
        elif key.endswith("attention.wk.weight"):
            state[key] = meta_to_hf_rotary(state[key], config.n_kv_heads)
    return config, state


def _tie_from_weights(config: LlamaConfig, state: dict[str, torch.Tensor]) -> LlamaConfig:
    """Meta files record tying only in their weights: no output.weight means tied, and an
    output.weight that differs from the embeddings means untied, whatever the shape table says."""
    output = state.get("output.weight")
    if output is None:
        return dataclasses.replace(config, tie_embeddings=True)
    if config.tie_embeddings and not torch.equal(output, state["tok_embeddings.weight"]):
        return dataclasses.replace(config, tie_embeddings=False)
    return config


def _merge_meta_shards(shards: list[dict[str, torch.Tensor]], *, dim: int) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for key, first in shards[0].items():
        parts = [s[key] for s in shards]
        kind = key.split(".")[-2] if key.endswith(".weight") else key
        if first.ndim == 1:  # norms are replicated
            merged[key] = first
        elif kind == "tok_embeddings":  # Llama 2 cut it by columns, Llama 3 by rows
            merged[key] = torch.cat(parts, dim=1 if first.shape[1] != dim else 0)
        elif kind in _META_SHARD_DIM:
            merged[key] = torch.cat(parts, dim=_META_SHARD_DIM[kind])
        else:
            merged[key] = first
    return merged


def save_llama_meta(model: Llama, path: str | Path) -> None:
    """Write `params.json` + `consolidated.00.pth` in Meta's layout (interleaved rotary rows).

    A tied model is written without output.weight, which is how `load_llama` knows it is tied.
    """
    if model.config.moe is not None:
        raise UserError("save_llama_meta: Meta's layout has no Mixture-of-Experts feed-forwards (text.moe); "
                        "use save_llama_hf")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        del state["output.weight"]
    for key in state:
        if key.endswith("attention.wq.weight"):
            state[key] = hf_to_meta_rotary(state[key], c.n_heads)
        elif key.endswith("attention.wk.weight"):
            state[key] = hf_to_meta_rotary(state[key], c.n_kv_heads)
    params = {
        "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "max_seq_len": c.max_seq_len, **_meta_ffn_params(c),
    }
    params.update(rope_scaling_to_meta(c.rope_scaling))
    (path / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save(state, path / "consolidated.00.pth")


def _meta_ffn_params(c: LlamaConfig) -> dict:
    """Find multiple_of / ffn_dim_multiplier that reproduce hidden_dim under Meta's rule."""
    base = int(2 * (4 * c.dim) / 3)
    if c.hidden_dim == base:
        return {"multiple_of": 1}
    multiplier = c.hidden_dim / base
    for eps in (0.0, 1e-9, 1e-6):
        if int((multiplier + eps) * base) == c.hidden_dim:
            return {"multiple_of": 1, "ffn_dim_multiplier": multiplier + eps}
    raise ValueError(f"hidden_dim {c.hidden_dim} cannot be expressed in Meta's params.json rule")
