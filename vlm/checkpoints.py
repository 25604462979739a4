"""Import and export Llama weights in Hugging Face and Meta layouts.

- Hugging Face: `config.json` + `model.safetensors` (or shards listed in
  `model.safetensors.index.json`). Same rotary layout as ours; only names differ.
- Meta: `params.json` + `consolidated.*.pth`, loaded with `weights_only=True`. Their rotary
  layout interleaves the two halves of each head, so q/k rows are permuted on load.

Nothing here unpickles arbitrary objects: torch files are read with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.errors import UserError
from vlm.text.llama import Llama, LlamaConfig
from vlm.text.rope import RopeScaling

_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def ours_to_hf(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if m := _LAYER_KEY.fullmatch(name):
        return f"model.layers.{m[1]}.{_HF_LAYER_NAMES[m[2]]}.weight"
    return f"{_HF_TOP_NAMES[name.removesuffix('.weight')]}.weight"


def hf_to_ours(name: str) -> str:
    inverse_layer = {v: k for k, v in _HF_LAYER_NAMES.items()}
    inverse_top = {v: k for k, v in _HF_TOP_NAMES.items()}
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name):
        if m[2] in inverse_layer:
            return f"layers.{m[1]}.{inverse_layer[m[2]]}.weight"
    elif name.endswith(".weight") and name.removesuffix(".weight") in inverse_top:
        return f"{inverse_top[name.removesuffix('.weight')]}.weight"
    raise KeyError(f"unexpected tensor {name!r} in a Hugging Face Llama checkpoint")


# --- configs ---------------------------------------------------------------------------------

_HF_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
_HF_LLAMA3_ROPE_REQUIRED = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_META_REQUIRED = ("dim", "n_layers", "n_heads")


def _require(config: object, keys: tuple[str, ...], source: str, *, where: str = "") -> None:
    """UserError naming the file and every missing key (`where`: the nested object they belong in)."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a JSON object{where}, got {type(config).__name__}")
    missing = [key for key in keys if config.get(key) is None]
    if missing:
        raise UserError(f"{source}: missing required key(s) {', '.join(missing)}{where} (required: {', '.join(keys)}): "
                        "add them, or use the file that came with the checkpoint")


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file} is not valid JSON ({error}): restore the checkpoint's own file") from None


def config_from_hf(hf: dict, *, source: str = "config.json") -> LlamaConfig:
    """A LlamaConfig from a Hugging Face `config.json` dict; UserError naming `source` and the missing
    keys when it lacks one that has no default."""
    _require(hf, _HF_REQUIRED, source)
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'llama'")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{source}: attention_bias / mlp_bias are not supported by this Llama")
    return LlamaConfig(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        vocab_size=hf["vocab_size"],
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling_from_hf(hf, source),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _rope_scaling_from_hf(hf: dict, source: str) -> RopeScaling | None:
    # transformers 4.x writes `rope_scaling`; 5.x writes `rope_parameters` (which also holds theta).
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")
    _require(params, _HF_LLAMA3_ROPE_REQUIRED, source, where=" in rope_scaling / rope_parameters")
    return RopeScaling(
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position_embeddings=params["original_max_position_embeddings"],
    )


def config_to_hf(config: LlamaConfig, *, dtype: torch.dtype = torch.float32) -> dict:
    rope = None
    if config.rope_scaling is not None:
        rope = {"rope_type": "llama3", **vars(config.rope_scaling)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


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
    scaling = None
    if factor is not None or params.get("use_scaled_rope"):
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


# --- loading ---------------------------------------------------------------------------------


def load_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    rope_scaling_factor: float | None = None,
) -> Llama:
    """Load a Llama from a Hugging Face directory or a Meta directory (detected by its files).

    `rope_scaling_factor` overrides the Llama 3 RoPE factor of the checkpoint; Meta's params.json
    often leaves it out and gets a guess (see `config_from_meta`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory holding a Llama checkpoint")
    if (path / "config.json").exists():
        config, state = _read_hf(path)
        if rope_scaling_factor is not None:
            scaling = dataclasses.replace(config.rope_scaling or RopeScaling(), factor=rope_scaling_factor)
            config = dataclasses.replace(config, rope_scaling=scaling)
    elif (path / "params.json").exists():
        config, state = _read_meta(path, rope_scaling_factor=rope_scaling_factor)
    else:
        raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")
    with torch.device("meta"):
        model = Llama(config)
    load_state_exact(model, state, source=str(path))
    return model.to(device=device, dtype=dtype)


def load_state_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict(assign=True), but every missing, unexpected or mis-shaped tensor is named."""
    expected = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied:
        expected.pop("output.weight", None)
        state = {k: v for k, v in state.items() if k != "output.weight"}
    problems = [f"missing tensor {k} (expected shape {tuple(v.shape)})" for k, v in expected.items() if k not in state]
    problems += [f"unexpected tensor {k} (shape {tuple(v.shape)})" for k, v in state.items() if k not in expected]
    problems += [
        f"tensor {k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ValueError(f"{source}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight


def _read_hf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    config = config_from_hf(_read_json(path / "config.json"), source=str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        raw: dict[str, torch.Tensor] = {}
        for name in files:
            raw.update(load_file(path / name))
    elif (path / "model.safetensors").exists():
        raw = load_file(path / "model.safetensors")
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    # Non-persistent rotary buffers that old exports sometimes contain.
    raw = {k: v for k, v in raw.items() if not k.endswith("rotary_emb.inv_freq")}
    return config, {hf_to_ours(k): v for k, v in raw.items()}


# Meta checkpoints split across model-parallel ranks: along which dim each weight was cut.
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


# --- saving ----------------------------------------------------------------------------------


def save_llama_hf(model: Llama, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a directory that `transformers.LlamaForCausalLM.from_pretrained` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {ours_to_hf(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = next(iter(state.values())).dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype=dtype), indent=2) + "\n")
    shards = _split_by_size(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _split_by_size(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_llama_meta(model: Llama, path: str | Path) -> None:
    """Write `params.json` + `consolidated.00.pth` in Meta's layout (interleaved rotary rows).

    A tied model is written without output.weight, which is how `load_llama` knows it is tied.
    """
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
    if c.rope_scaling is not None:
        if (c.rope_scaling.low_freq_factor, c.rope_scaling.original_max_position_embeddings) != (1.0, 8192):
            raise ValueError(
                "Meta's params.json fixes low_freq_factor=1 and original_max_position_embeddings=8192; "
                f"this model has {c.rope_scaling.low_freq_factor} and {c.rope_scaling.original_max_position_embeddings}"
            )
        params.update(use_scaled_rope=True, rope_scaling_factor=c.rope_scaling.factor,
                      high_freq_factor=c.rope_scaling.high_freq_factor)
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
