"""The Hugging Face layout: `config.json` + `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Same rotary layout as ours; only names differ. `model_type`
`mixtral` is a Llama with MoE feed-forwards (`vlm.checkpoints.mixtral` maps those)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.checkpoints.common import _read_json, _require
from vlm.checkpoints.mixtral import mixtral_to_ours, moe_from_mixtral, moe_to_hf, ours_to_mixtral
from vlm.text.llama import Llama, LlamaConfig
from vlm.checkpoints.rope import rope_parameters_to_hf, rope_scaling_from_hf, rope_scaling_to_hf

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
# The model types read (vlm_moe: our MoE configs Mixtral cannot hold, see vlm.checkpoints.mixtral)
# and transformers' RoPE theta for each when config.json has none.
_DEFAULT_THETA = {"llama": 10000.0, "mixtral": 1000000.0, "vlm_moe": 10000.0}


def config_from_hf(hf: dict, *, source: str = "config.json") -> LlamaConfig:
    """A LlamaConfig from a Hugging Face `config.json` dict; UserError naming `source` and the missing
    keys when it lacks one that has no default."""
    _require(hf, _HF_REQUIRED, source)
    model_type = hf.get("model_type", "llama")
    if model_type not in _DEFAULT_THETA:
        raise ValueError(f"{source}: model_type {model_type!r} is not one of {list(_DEFAULT_THETA)}")
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
        rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", _DEFAULT_THETA[model_type])),
        rope_scaling=rope_scaling_from_hf(hf, source=source),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=moe_from_mixtral(hf, n_layers=hf["num_hidden_layers"], source=source) if model_type != "llama" else None,
    )


def config_to_hf(config: LlamaConfig, *, dtype: torch.dtype = torch.float32) -> dict:
    moe = {} if config.moe is None else moe_to_hf(config.moe, hidden_dim=config.hidden_dim, n_layers=config.n_layers)
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
        "rope_scaling": rope_scaling_to_hf(config.rope_scaling),
        "rope_parameters": rope_parameters_to_hf(config.rope_scaling, config.rope_theta),  # transformers 5.x
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **moe,
    }


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
    state: dict[str, torch.Tensor] = {}
    if config.moe is not None:
        state, raw = mixtral_to_ours(raw, num_experts=config.moe.num_experts, source=str(path))
    return config, state | {hf_to_ours(k): v for k, v in raw.items()}


def save_llama_hf(model: Llama, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a directory that `transformers.LlamaForCausalLM.from_pretrained` loads (an MoE model:
    `MixtralForCausalLM`, per-expert layout; one Mixtral cannot hold: `vlm_moe`, for `load_llama` only)."""
    path = Path(path)
    config = config_to_hf(model.config)
    path.mkdir(parents=True, exist_ok=True)
    state, rest = ours_to_mixtral(model.state_dict()) if model.config.moe is not None else ({}, model.state_dict())
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    state |= {ours_to_hf(k): v.detach().cpu().contiguous() for k, v in rest.items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = next(iter(state.values())).dtype
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
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
