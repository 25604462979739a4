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

Mixtral routes by softmax, top-k, renormalised, no capacity, every layer MoE, no shared expert; an
MoE config that differs is refused on export. Its auxiliary loss pools the layers and counts each
of the k choices (k times ours at one layer), so `aux_loss_coef` = `router_aux_loss_coef` * k / L
gives the same penalty at a uniform load. `router_jitter_noise` (training-time noise) is not
implemented and is dropped with a warning when non-zero.
"""

from __future__ import annotations

import re
import warnings

import torch

from vlm.errors import UserError
from vlm.text.moe import MoEConfig

_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_GATE = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_OURS = re.compile(r"layers\.(\d+)\.feed_forward\.(gate\.weight|experts\.w[123])")


def moe_from_mixtral(hf: dict, *, n_layers: int, source: str) -> MoEConfig:
    """The MoE config of a Mixtral `config.json` dict."""
    if hf.get("sliding_window") is not None:
        raise UserError(f"{source}: sliding_window {hf['sliding_window']} is not supported (full attention only)")
    if hf.get("router_jitter_noise"):
        warnings.warn(f"{source}: router_jitter_noise {hf['router_jitter_noise']} is not implemented; training runs without it")
    top_k = hf.get("num_experts_per_tok", 2)
    return MoEConfig(num_experts=hf.get("num_local_experts", 8), top_k=top_k,
                     aux_loss_coef=hf.get("router_aux_loss_coef", 0.001) * top_k / n_layers)


def moe_to_mixtral(moe: MoEConfig, *, hidden_dim: int, n_layers: int) -> dict:
    """The Mixtral `config.json` keys of an MoE config; UserError naming what Mixtral cannot hold."""
    differences = {"router": ("token_choice", moe.router), "score": ("softmax", moe.score),
                   "renormalize": (True, moe.renormalize), "capacity_factor": (None, moe.capacity_factor),
                   "shared_experts": (0, moe.shared_experts), "every_n_layers": (1, moe.every_n_layers),
                   "first_dense_layers": (0, moe.first_dense_layers),
                   "expert_hidden_dim": (hidden_dim, moe.expert_hidden_dim or hidden_dim)}
    bad = [f"text.moe.{key} {got!r} (Mixtral: {want!r})" for key, (want, got) in differences.items() if want != got]
    if moe.balance == "bias":
        bad.append("text.moe.balance 'bias' (Mixtral routes without a per-expert bias)")
    if bad:
        raise UserError("this MoE model has no Mixtral equivalent: " + "; ".join(bad))
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "router_jitter_noise": 0.0, "sliding_window": None,
            "router_aux_loss_coef": moe.aux_loss_coef * n_layers / moe.top_k, "output_router_logits": False}


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
            raise ValueError(f"{source}: layer {layer} {weight}: experts {missing} missing, {extra} beyond "
                             f"num_local_experts {num_experts}")
        ours[f"layers.{layer}.feed_forward.experts.{weight}"] = torch.stack([experts[e] for e in range(num_experts)])
    return ours, rest


def ours_to_mixtral(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split our state dict into (Mixtral per-expert tensors, the rest)."""
    mixtral: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _OURS.fullmatch(name)
        if m is None:
            rest[name] = tensor
        elif m[2] == "gate.weight":
            mixtral[f"model.layers.{m[1]}.block_sparse_moe.gate.weight"] = tensor
        else:
            weight = m[2].removeprefix("experts.")
            for e, expert in enumerate(tensor.unbind(0)):
                mixtral[f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{weight}.weight"] = expert.clone()
    return mixtral, rest
