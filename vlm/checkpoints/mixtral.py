"""The Mixtral layout (`transformers.MixtralForCausalLM`): a Llama whose feed-forwards are sparse
MoE blocks. Attention, norms and embeddings are named as in Llama (`vlm.checkpoints.hf` maps them);
this module maps the MoE tensors and the config keys.

Two tensor layouts, both read:
- per expert (what `save_pretrained` writes, and every Mixtral on the Hub):
  `model.layers.N.block_sparse_moe.gate.weight` [E, D], `...experts.M.w1/w3.weight` [H, D],
  `...experts.M.w2.weight` [D, H];
- fused (transformers >= 5 in memory, and `save_pretrained(save_original_format=False)`):
  `model.layers.N.mlp.gate.weight`, `mlp.experts.gate_up_proj` [E, 2H, D] (w1 rows, then w3 rows),
  `mlp.experts.down_proj` [E, D, H].
We write the per-expert layout. Ours stacks the experts: `layers.N.feed_forward.experts.w1` [E, H, D].

Mixtral routes by softmax, top-k, renormalised, no capacity, every layer MoE, no shared expert and no
selection bias. Its auxiliary loss pools the layers and counts each of the k choices (k times ours at
one layer), so `aux_loss_coef` = `router_aux_loss_coef` * k / L gives the same penalty at a uniform
load. `router_jitter_noise` (training-time noise) is not implemented and is dropped with a warning.

Our whole MoE config is also written under `vlm_moe` (transformers keeps unknown config keys), and
read back from there first, so that our own exports round-trip exactly. An MoE config Mixtral cannot
hold is written with `model_type` `vlm_moe` (transformers refuses it rather than computing something
else): Mixtral's tensor names, plus `block_sparse_moe.shared_expert.{gate,up,down}_proj` for shared
experts, `block_sparse_moe.expert_bias` for the balancing bias, and Llama's `mlp.*` for dense layers.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch

from vlm.errors import UserError
from vlm.text.moe import MoEConfig

_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_GATE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_OURS = re.compile(r"layers\.(\d+)\.feed_forward\.(gate\.weight|experts\.w[123]|expert_bias|shared\.w[123]\.weight)")
_SHARED = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXTRA = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.(expert_bias|shared_expert\.(gate|down|up)_proj\.weight)")


def moe_from_mixtral(hf: dict, *, n_layers: int, source: str) -> MoEConfig:
    """The MoE config of a Mixtral (or our `vlm_moe`) `config.json` dict."""
    if hf.get("sliding_window") is not None:
        raise UserError(f"{source}: sliding_window {hf['sliding_window']} is not supported (full attention only)")
    if isinstance(hf.get("vlm_moe"), dict):
        try:
            return MoEConfig.from_dict(hf["vlm_moe"])
        except (TypeError, ValueError) as error:
            raise UserError(f"{source}: vlm_moe: {error}") from None
    if hf.get("router_jitter_noise"):
        warnings.warn(f"{source}: router_jitter_noise {hf['router_jitter_noise']} is not implemented; training runs without it")
    top_k = hf.get("num_experts_per_tok", 2)
    return MoEConfig(num_experts=hf.get("num_local_experts", 8), top_k=top_k,
                     aux_loss_coef=hf.get("router_aux_loss_coef", 0.001) * top_k / n_layers)


def mixtral_differences(moe: MoEConfig, *, hidden_dim: int) -> list[str]:
    """What of `moe` a Mixtral checkpoint cannot hold (empty: it is a Mixtral)."""
    mixtral = {"router": "token_choice", "score": "softmax", "renormalize": True, "capacity_factor": None,
               "shared_experts": 0, "every_n_layers": 1, "first_dense_layers": 0, "expert_hidden_dim": hidden_dim}
    ours = {**dataclasses.asdict(moe), "expert_hidden_dim": moe.expert_hidden_dim or hidden_dim}
    bad = [f"{key} {ours[key]!r} (Mixtral: {want!r})" for key, want in mixtral.items() if ours[key] != want]
    return bad + (["balance 'bias' (Mixtral has no selection bias)"] if moe.balance == "bias" else [])


def moe_to_hf(moe: MoEConfig, *, hidden_dim: int, n_layers: int) -> dict:
    """The `config.json` keys of an MoE config: Mixtral's, or `vlm_moe` when Mixtral cannot hold it."""
    keys = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "router_jitter_noise": 0.0, "sliding_window": None,
            "router_aux_loss_coef": moe.aux_loss_coef * n_layers / moe.top_k, "output_router_logits": False,
            "vlm_moe": dataclasses.asdict(moe)}
    if mixtral_differences(moe, hidden_dim=hidden_dim):
        keys.update(architectures=["VlmMoeForCausalLM"], model_type="vlm_moe")
    return keys


def mixtral_to_ours(raw: dict[str, torch.Tensor], *, num_experts: int, source: str) -> tuple[dict, dict]:
    """Split a Mixtral state dict into (our MoE tensors, the Llama-named rest)."""
    ours: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in raw.items():
        if m := _PER_EXPERT.fullmatch(name):
            per_expert.setdefault((m[1], m[3]), {})[int(m[2])] = tensor
        elif m := _GATE.fullmatch(name):
            ours[f"layers.{m[1]}.feed_forward.gate.weight"] = tensor
        elif m := _EXTRA.fullmatch(name):
            shared = {v: k for k, v in _SHARED.items()}
            key = "expert_bias" if m[2] == "expert_bias" else f"shared.{shared[m[3] + '_proj']}.weight"
            ours[f"layers.{m[1]}.feed_forward.{key}"] = tensor
        elif (m := _FUSED.fullmatch(name)) and m[2] == "down_proj":
            ours[f"layers.{m[1]}.feed_forward.experts.w2"] = tensor
        elif m:
            w1, w3 = tensor.chunk(2, dim=1)  # [E, 2H, D]: the gate projection's rows first
            ours[f"layers.{m[1]}.feed_forward.experts.w1"] = w1.contiguous()
            ours[f"layers.{m[1]}.feed_forward.experts.w3"] = w3.contiguous()
        else:
            rest[name] = tensor
    for (layer, weight), experts in per_expert.items():
        missing = sorted(set(range(num_experts)) - set(experts))
        extra = sorted(set(experts) - set(range(num_experts)))
        if missing or extra:
            problems = ([f"experts {missing} missing"] if missing else []) + ([f"experts {extra} beyond "
                        f"num_local_experts {num_experts}"] if extra else [])
            raise ValueError(f"{source}: layer {layer} {weight}: {', '.join(problems)}")
        ours[f"layers.{layer}.feed_forward.experts.{weight}"] = torch.stack([experts[e] for e in range(num_experts)])
    return ours, rest


def ours_to_mixtral(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split our state dict into (Mixtral per-expert tensors, shared experts and biases; the rest)."""
    mixtral: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _OURS.fullmatch(name)
        if m is None:
            rest[name] = tensor
        elif m[2] == "gate.weight":
            mixtral[f"model.layers.{m[1]}.block_sparse_moe.gate.weight"] = tensor
        elif m[2] == "expert_bias":
            mixtral[f"model.layers.{m[1]}.block_sparse_moe.expert_bias"] = tensor
        elif m[2].startswith("shared."):
            mixtral[f"model.layers.{m[1]}.block_sparse_moe.shared_expert.{_SHARED[m[2].split('.')[1]]}.weight"] = tensor
        else:
            weight = m[2].removeprefix("experts.")
            for e, expert in enumerate(tensor.unbind(0)):
                mixtral[f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{weight}.weight"] = expert.clone()
    return mixtral, rest
