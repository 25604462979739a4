"""An open_clip ViT tower as a Hugging Face ``CLIPVisionModel``: the same computation under CLIP's names.

open_clip's ViT and Hugging Face's CLIP vision model are one architecture (patch embedding without
bias, class token, learned positions, pre-norm, pre-norm blocks); the packed attention projection
``in_proj_weight`` splits into ``q_proj``, ``k_proj``, ``v_proj``. The encoder is pruned after its
feature layer (``OpenClipEncoder``), so the exported tower has the kept blocks only and its features
are the last hidden state; its final norm is an identity (never used by LLaVA's features). Towers
with parts CLIP lacks (layer scale, attention pooling, timm trunks, ResNets) are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm.errors import UserError
from vlm.vision.open_clip import OpenClipEncoder

_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}
_SUPPORTED = ("open_clip ViT towers with a class token, learned positions and plain pre-norm blocks "
              "(no layer scale, attention pooling, timm trunk or ResNet)")


def open_clip_as_hf_clip(encoder: OpenClipEncoder) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(Hugging Face CLIP vision settings, ``vision_model.*`` state) of the encoder's pruned tower."""
    visual = encoder.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1") or getattr(visual, "class_embedding", None) is None:
        raise UserError(f"open_clip tower {type(visual).__name__} has no Hugging Face CLIP layout; supported: {_SUPPORTED}")
    first = blocks[0]
    activation = _ACTIVATIONS.get(type(first.mlp.gelu).__name__) if hasattr(first.mlp, "gelu") else None
    if activation is None:
        raise UserError(f"open_clip tower: MLP activation {first.mlp!r} has no CLIP equivalent; supported: {_SUPPORTED}")
    settings = {"hidden_size": visual.conv1.out_channels, "intermediate_size": first.mlp.c_fc.out_features,
                "num_hidden_layers": len(blocks), "num_attention_heads": first.attn.num_heads,
                "image_size": encoder.image_size, "patch_size": visual.conv1.kernel_size[0],
                "hidden_act": activation, "layer_norm_eps": first.ln_1.eps}
    return settings, _hf_state(visual.state_dict(), settings["hidden_size"])


def _hf_state(state: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    state = dict(state)
    ones, zeros = torch.ones(dim), torch.zeros(dim)
    out = {"vision_model.embeddings.class_embedding": state.pop("class_embedding"),
           "vision_model.embeddings.patch_embedding.weight": state.pop("conv1.weight"),
           "vision_model.embeddings.position_embedding.weight": state.pop("positional_embedding"),
           # no_ln_pre towers: an identity norm; the final norm is never part of LLaVA's features
           "vision_model.pre_layrnorm.weight": state.pop("ln_pre.weight", ones),
           "vision_model.pre_layrnorm.bias": state.pop("ln_pre.bias", zeros),
           "vision_model.post_layernorm.weight": ones.clone(), "vision_model.post_layernorm.bias": zeros.clone()}
    index = 0
    while f"transformer.resblocks.{index}.ln_1.weight" in state:
        out.update(_block(state, f"transformer.resblocks.{index}.", f"vision_model.encoder.layers.{index}."))
        index += 1
    if state:
        raise UserError(f"open_clip tower tensors {sorted(state)[:5]} have no Hugging Face CLIP name; "
                        f"supported: {_SUPPORTED}")
    return {key: value.detach().clone() for key, value in out.items()}


def _block(state: dict[str, torch.Tensor], ours: str, theirs: str) -> dict[str, torch.Tensor]:
    out = {}
    for kind in ("weight", "bias"):
        for q_k_v, tensor in zip(("q_proj", "k_proj", "v_proj"), state.pop(f"{ours}attn.in_proj_{kind}").chunk(3)):
            out[f"{theirs}self_attn.{q_k_v}.{kind}"] = tensor
        for name, hf_name in _BLOCK_NAMES.items():
            out[f"{theirs}{hf_name}.{kind}"] = state.pop(f"{ours}{name}.{kind}")
    return out


def resize_mode(transform: Any) -> str:
    """``"crop"`` (short side resized, centre crop) or ``"squash"`` from an eval pipeline's steps."""
    steps = [type(step).__name__ for step in getattr(getattr(transform, "pipeline", None), "transforms", [])]
    sizes = [getattr(step, "size", None) for step in transform.pipeline.transforms] if steps else []
    if "Resize" in steps and "CenterCrop" in steps and isinstance(sizes[steps.index("Resize")], int):
        return "crop"
    if "Resize" in steps and "CenterCrop" not in steps and not isinstance(sizes[steps.index("Resize")], int):
        return "squash"
    raise UserError(f"the tower's image transform ({', '.join(steps) or transform!r}) has no Hugging Face image "
                    "processor equivalent: export needs a resize + centre crop or a squash to the square")

