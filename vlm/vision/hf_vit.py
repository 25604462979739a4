"""Hugging Face CLIP / SigLIP vision transformers, written here: no ``transformers`` at run time.

``VisionConfig(name="hf_vit", model=...)`` where ``model`` is the family, ``"clip"`` or ``"siglip"``
(with the Hugging Face vision config keys in ``model_kwargs``: hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, image_size, patch_size, hidden_act, layer_norm_eps,
vision_use_head), or a Hugging Face ``config.json`` / a directory holding one (a CLIP/SigLIP vision
model, a whole CLIP/SigLIP model, or a LLaVA model: its ``vision_config`` is read). Parameter names
are those of ``CLIPVisionModel`` / ``SiglipVisionModel`` (``vision_model.encoder.layers.N...``), so
their safetensors load as they are (``checkpoint_path``).

Features: ``feature_layer`` counts blocks as the other encoders do (block k's output is Hugging
Face's ``hidden_states[k + 1]``; negative indices are the same in both), and ``keep_prefix_tokens``
keeps CLIP's class token (LLaVA's ``vision_feature_select_strategy`` ``"full"``; ``"default"`` drops
it). Blocks after the feature layer, the final norm and SigLIP's pooling head are kept (their
weights round-trip) but never run and never train.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from vlm.errors import UserError
from vlm.vision.base import VisionConfig, VisionEncoder, register
from vlm.vision.checkpoint import load_state_dict_checked, read_state_dict
from vlm.vision.transform import ImageTransform

# Hugging Face's defaults for keys a config.json leaves out (CLIPVisionConfig / SiglipVisionConfig)
DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "siglip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
               "vision_use_head": True},
}
MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# the processors' defaults: CLIP resizes the short side and centre-crops, SigLIP squashes to the square
PREPROCESS: dict[str, dict[str, Any]] = {
    "clip": {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
             "resize": "crop"},
    "siglip": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize": "squash"},
}
_IGNORED_KEYS = {"num_channels", "attention_dropout", "projection_dim", "model_type", "initializer_range",
                 "initializer_factor", "dropout", "vocab_size"}
_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def resolve_hf_vision(config: VisionConfig) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(family, the complete vision config, preprocessing) for ``config``; one-line errors."""
    kwargs = dict(config.model_kwargs)
    preprocess = kwargs.pop("preprocess", {}) or {}
    family, base, base_preprocess = _base(config.model)
    unknown = sorted(set(kwargs) - set(DEFAULTS[family]) - _IGNORED_KEYS)
    if unknown:
        raise UserError(f"hf_vit {family} model_kwargs: unknown keys {unknown}; known: {sorted(DEFAULTS[family])} "
                        "and preprocess")
    # a config.json holds much else (architectures, dtype, ...): only what shapes the tower is read
    read = {k: v for k, v in base.items() if k in DEFAULTS[family] or k == "num_channels"}
    settings = {**DEFAULTS[family], **read, **kwargs}
    if config.image_size is not None:
        settings["image_size"] = config.image_size
    if settings["hidden_act"] not in _ACTIVATIONS:
        raise UserError(f"hf_vit: hidden_act {settings['hidden_act']!r} is not supported; "
                        f"use one of {sorted(_ACTIVATIONS)}")
    if settings.get("num_channels", 3) != 3:
        raise UserError(f"hf_vit: num_channels {settings['num_channels']} is not supported (RGB images only)")
    if settings["image_size"] % settings["patch_size"] or settings["hidden_size"] % settings["num_attention_heads"]:
        raise UserError(f"hf_vit: image_size {settings['image_size']} must be a multiple of patch_size "
                        f"{settings['patch_size']} and hidden_size of num_attention_heads")
    options = {**PREPROCESS[family], **base_preprocess, **preprocess}
    if set(options) != set(PREPROCESS[family]) or options["resize"] not in ("crop", "squash"):
        raise UserError(f"hf_vit model_kwargs.preprocess {preprocess}: keys are mean, std and resize ('crop': short "
                        "side resized then centre-cropped, as CLIPImageProcessor; 'squash': resized to the square)")
    return family, {k: v for k, v in settings.items() if k not in _IGNORED_KEYS}, options


def _base(model: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Family, config entries and preprocessing named by ``VisionConfig.model``."""
    if model in DEFAULTS:
        return model, {}, {}
    path = Path(model)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"hf_vit model {model!r} (model.config.vision.model): use 'clip' or 'siglip', or the path of a "
                        "Hugging Face config.json (or of the directory holding it)")
    data = json.loads(file.read_text())
    data = data.get("vision_config", data) if data.get("model_type") not in MODEL_TYPES else data
    family = MODEL_TYPES.get(data.get("model_type"))
    if family is None:
        raise UserError(f"{file}: vision model_type {data.get('model_type')!r} is not one of {sorted(MODEL_TYPES)}")
    return family, dict(data), processor_preprocess(file.parent / "preprocessor_config.json")


def processor_preprocess(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    found = {"mean": data.get("image_mean"), "std": data.get("image_std")}
    if "do_center_crop" in data:
        found["resize"] = "crop" if data["do_center_crop"] else "squash"
    return {k: tuple(v) if isinstance(v, list) else v for k, v in found.items() if v is not None}


class Embeddings(nn.Module):
    """Patches (+ CLIP's class token) plus learned positions: [B, 3, S, S] -> [B, (1 +) P, D]."""

    def __init__(self, dim: int, *, image_size: int, patch_size: int, class_token: bool) -> None:
        super().__init__()
        patches = (image_size // patch_size) ** 2
        if class_token:
            self.class_embedding = nn.Parameter(torch.randn(dim) * dim**-0.5)
        # CLIP's patch projection has no bias, SigLIP's has one
        self.patch_embedding = nn.Conv2d(3, dim, patch_size, stride=patch_size, bias=not class_token)
        self.position_embedding = nn.Embedding(patches + class_token, dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, N, d]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, settings: dict[str, Any], *, dropout: float = 0.0) -> None:
        super().__init__()
        dim, eps = settings["hidden_size"], settings["layer_norm_eps"]
        self.self_attn = Attention(dim, settings["num_attention_heads"], dropout=dropout)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, settings["intermediate_size"], settings["hidden_act"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PoolingHead(nn.Module):
    """SigLIP's attention-pooling head: its weights are kept for the round trip, it never runs here."""

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__()
        dim = settings["hidden_size"]
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, settings["num_attention_heads"], batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=settings["layer_norm_eps"])
        self.mlp = MLP(dim, settings["intermediate_size"], settings["hidden_act"])


class VisionTransformer(nn.Module):
    """The ``vision_model`` of a CLIP / SigLIP vision model, under Hugging Face's names."""

    def __init__(self, family: str, settings: dict[str, Any], *, dropout: float = 0.0) -> None:
        super().__init__()
        dim, eps = settings["hidden_size"], settings["layer_norm_eps"]
        self.embeddings = Embeddings(dim, image_size=settings["image_size"], patch_size=settings["patch_size"],
                                     class_token=family == "clip")
        if family == "clip":
            self.pre_layrnorm = nn.LayerNorm(dim, eps=eps)  # sic: Hugging Face's spelling
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(settings, dropout=dropout)
                                            for _ in range(settings["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(dim, eps=eps)
        if family == "siglip" and settings.get("vision_use_head", True):
            self.head = PoolingHead(settings)


@register("hf_vit")
class HFVisionEncoder(VisionEncoder):
    """Tokens ``[B, N, D]`` after block ``feature_layer`` of a CLIP / SigLIP vision transformer.

    Args:
        family: ``"clip"`` (class token, pre-norm of the embeddings) or ``"siglip"`` (neither).
        settings: the complete Hugging Face vision config (``resolve_hf_vision``).
        preprocess: mean, std and resize mode of the image transform.
        feature_layer: block index; negative counts from the end.
        keep_prefix_tokens: keep CLIP's class token in front of the patches.
    """

    def __init__(self, family: str, settings: dict[str, Any], *, preprocess: dict[str, Any], feature_layer: int = -2,
                 keep_prefix_tokens: bool = False) -> None:
        super().__init__()
        layers = settings["num_hidden_layers"]
        if not -layers <= feature_layer < layers:
            raise UserError(f"hf_vit: feature_layer {feature_layer} does not exist in a tower of {layers} blocks")
        self.family, self.settings, self.preprocess = family, dict(settings), dict(preprocess)
        self.vision_model = VisionTransformer(family, settings)
        self.feature_layer, self.keep_prefix_tokens = feature_layer, keep_prefix_tokens
        self.depth = feature_layer % layers + 1  # blocks run
        for module in [*self.vision_model.encoder.layers[self.depth:], self.vision_model.post_layernorm,
                       getattr(self.vision_model, "head", nn.Identity())]:
            module.requires_grad_(False)  # never run: no gradient would reach them
        self.image_size = settings["image_size"]
        self.transform = hf_transform(preprocess, self.image_size)
        self.num_tokens, self.dim = self.probe_output_shape()

    @classmethod
    def from_config(cls, config: VisionConfig) -> HFVisionEncoder:
        if config.pretrained:
            raise UserError("hf_vit: set checkpoint_path to the model's safetensors instead of pretrained=True")
        family, settings, preprocess = resolve_hf_vision(config)
        return cls(family, settings, preprocess=preprocess, feature_layer=config.feature_layer,
                   keep_prefix_tokens=config.keep_prefix_tokens)

    @property
    def prefix_tokens(self) -> int:
        return int(self.family == "clip")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self.vision_model
        x = model.embeddings(pixels)
        if self.family == "clip":
            x = model.pre_layrnorm(x)
        for layer in model.encoder.layers[:self.depth]:
            x = layer(x)
        return x if self.keep_prefix_tokens else x[:, self.prefix_tokens:]

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """A ``CLIPVisionModel`` / ``SiglipVisionModel`` state dict (``vision_model.`` prefix or not), or
        a whole CLIP / SigLIP model's (its ``vision_model.*`` tensors)."""
        load_state_dict_checked(self, hf_vision_state(read_state_dict(path)), source=str(path))


def hf_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of any CLIP/SigLIP vision layout -> ``vision_model.*``; text towers and projections dropped."""
    if not any(key.startswith("vision_model.") for key in state):
        state = {f"vision_model.{key}": value for key, value in state.items()}
    # position_ids: a buffer older transformers saved; the rest belongs to a whole CLIP/SigLIP model
    return {k: v for k, v in state.items() if k.startswith("vision_model.") and not k.endswith(".position_ids")}


def hf_transform(preprocess: dict[str, Any], image_size: int) -> ImageTransform:
    """Bicubic resize (short side + centre crop, or squash to the square), then normalise."""
    bicubic = transforms.InterpolationMode.BICUBIC
    if preprocess["resize"] == "crop":
        resize = [transforms.Resize(image_size, interpolation=bicubic), transforms.CenterCrop(image_size)]
    else:
        resize = [transforms.Resize((image_size, image_size), interpolation=bicubic)]
    pipeline = transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(preprocess["mean"],
                                                                                        preprocess["std"])])
    return ImageTransform(pipeline, image_size=image_size, mean=preprocess["mean"], std=preprocess["std"])


def to_hf_feature_layer(feature_layer: int) -> int:
    """vlm's block index -> Hugging Face's ``vision_feature_layer`` (an index into ``hidden_states``)."""
    return feature_layer if feature_layer < 0 else feature_layer + 1


def from_hf_feature_layer(layer: Any, *, source: str) -> int:
    """Hugging Face's ``vision_feature_layer`` -> vlm's block index; one-line error for what vlm lacks."""
    if isinstance(layer, list) or not isinstance(layer, int) or isinstance(layer, bool) or layer == 0:
        raise UserError(f"{source}: vision_feature_layer {layer!r} is not supported: vlm reads one block's output "
                        "(a non-zero int), not the embeddings or several layers concatenated")
    return layer if layer < 0 else layer - 1
