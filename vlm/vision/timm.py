"""Any timm model as a vision encoder: patch tokens of one block via ``forward_intermediates``.

Checkpoints load in timm's own layout, or for timm's EfficientNets in the layout of lukemelas'
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``, ...), renamed by
``efficientnet_pytorch_to_timm``.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Collection, Mapping
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from timm.models import get_pretrained_cfg
from torch import nn

from vlm.vision.base import VisionConfig, VisionEncoder, register, unknown_model_error
from vlm.vision.checkpoint import load_state_dict_checked, read_state_dict
from vlm.vision.transform import ImageTransform

# EfficientNet-PyTorch -> timm EfficientNet names: the modules around the blocks ...
_EFFNET_PYTORCH_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                       "_fc": "classifier"}
# ... and inside a block, by timm block kind: a block without expansion (the first one of B0 and
# Lite0) is timm's DepthwiseSeparableConv, whose norms are bn1/bn2 where the others have bn2/bn3
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_PYTORCH_BLOCK = {
    "depthwise_separable": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", **_SE, "_project_conv": "conv_pw",
                            "_bn2": "bn2"},
    "inverted_residual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                          **_SE, "_project_conv": "conv_pwl", "_bn2": "bn3"},
}
_EFFNET_PYTORCH_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(.+)$")  # _blocks.N.<module>.<tensor>
_TIMM_BLOCK_KEY = re.compile(r"^(blocks\.(\d+)\.(\d+))\.")  # blocks.<stage>.<index>.


@register("timm")
class TimmEncoder(VisionEncoder):
    """Tokens ``[B, N, D]`` from block ``feature_layer`` of a timm model (stage, for CNNs).

    The model is pruned after that block (later blocks, final norm and head are removed), so a
    frozen tower costs no extra compute and an unfrozen one has no parameters without gradients.
    ``N`` is prefix tokens (if kept) plus the spatial positions, row-major.

    Args:
        model: a timm model with ``forward_intermediates`` (pruned in place).
        feature_layer: block index; negative counts from the end.
        keep_prefix_tokens: keep CLS/register tokens (ViT-like models only; CNNs have none).
        image_size: square input side the model expects.
        transform: PIL image -> normalised FloatTensor [3, image_size, image_size].
    """

    def __init__(self, model: nn.Module, *, feature_layer: int = -2, keep_prefix_tokens: bool = False,
                 image_size: int, transform: ImageTransform) -> None:
        super().__init__()
        if not (hasattr(model, "forward_intermediates") and hasattr(model, "prune_intermediate_layers")):
            raise ValueError(f"timm model {type(model).__name__} has no forward_intermediates")
        full_keys = frozenset(model.state_dict())
        try:
            self._indices = model.prune_intermediate_layers([feature_layer], prune_norm=True, prune_head=True)
        except AssertionError as err:  # timm's range check
            raise ValueError(f"feature_layer={feature_layer} does not exist in {type(model).__name__}: {err}") from err
        self._full_keys = full_keys  # the unpruned architecture, which checkpoints in other layouts map onto
        # keys a full checkpoint of this architecture has but the pruned model does not use
        self._unused_keys = frozenset(full_keys - set(model.state_dict()))
        self.model = model
        self.feature_layer = feature_layer
        self.keep_prefix_tokens = keep_prefix_tokens
        has_prefix = getattr(model, "num_prefix_tokens", 0) > 0
        can_return = "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters
        self._extra_kwargs = {"return_prefix_tokens": True} if keep_prefix_tokens and has_prefix and can_return else {}
        self.image_size = image_size
        self.transform = transform
        try:
            self.num_tokens, self.dim = self.probe_output_shape()
        except AssertionError as err:  # e.g. a fixed-size model fed another image_size
            raise ValueError(f"{type(model).__name__} rejects image_size={image_size}: {err}") from err

    @classmethod
    def from_config(cls, config: VisionConfig) -> TimmEncoder:
        model = create_timm_model(config)
        image_size = config.image_size or _model_image_size(model, config.model)
        return cls(model, feature_layer=config.feature_layer, keep_prefix_tokens=config.keep_prefix_tokens,
                   image_size=image_size, transform=timm_transform(model, image_size=image_size))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.model.forward_intermediates(
            pixels, indices=self._indices, stop_early=True, intermediates_only=True, **self._extra_kwargs)
        prefix = None
        if isinstance(features, tuple):  # (spatial, prefix) when prefix tokens were asked for
            features, prefix = features
        tokens = features.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        if prefix is not None:
            tokens = torch.cat([prefix, tokens], dim=1)  # [B, P + h*w, D]
        return tokens.contiguous()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a timm state dict (as timm saves it, head included or not) into the tower, or an
        EfficientNet-PyTorch one into a timm EfficientNet (``efficientnet_pytorch_to_timm``)."""
        state = read_state_dict(path)
        if is_efficientnet_pytorch_layout(state):
            if not _timm_efficientnet_blocks(self._full_keys):
                raise ValueError(f"checkpoint {path} is in the EfficientNet-PyTorch layout (_conv_stem, _blocks.N), "
                                 f"but timm model {type(self.model).__name__} is not an EfficientNet with "
                                 "depthwise-separable / inverted-residual blocks")
            state = efficientnet_pytorch_to_timm(state, self._full_keys)
        load_state_dict_checked(self.model, state, source=str(path), ignore=self._unused_keys)


def is_efficientnet_pytorch_layout(state: Mapping[str, Any]) -> bool:
    """Whether a state dict uses lukemelas' EfficientNet-PyTorch names (``_conv_stem``, ``_blocks.N``)."""
    return "_conv_stem.weight" in state and any(key.startswith("_blocks.") for key in state)


def efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor],
                                 timm_keys: Collection[str]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the timm EfficientNet whose keys are ``timm_keys``.

    Block ``N`` of the checkpoint is the N-th block of the timm model in stage order; its tensors
    are renamed by name with the rules of that timm block's kind. Keys no rule covers (another
    block kind, more blocks than the model has) are kept as they are, so that the strict load names
    them; shapes are checked there too.
    """
    blocks = _timm_efficientnet_blocks(timm_keys)
    renamed = {}
    for key, tensor in state.items():
        top, _, rest = key.partition(".")
        if top in _EFFNET_PYTORCH_TOP:
            key = f"{_EFFNET_PYTORCH_TOP[top]}.{rest}"
        elif (match := _EFFNET_PYTORCH_KEY.match(key)) and int(match[1]) < len(blocks):
            prefix, kind = blocks[int(match[1])]
            module = _EFFNET_PYTORCH_BLOCK[kind].get(match[2])
            key = f"{prefix}.{module}.{match[3]}" if module else key
        renamed[key] = tensor
    return renamed


def _timm_efficientnet_blocks(timm_keys: Collection[str]) -> list[tuple[str, str]]:
    """``[("blocks.<stage>.<index>", kind), ...]`` in stage order, for the blocks the rules know."""
    prefixes = sorted({(int(m[2]), int(m[3]), m[1]) for key in timm_keys if (m := _TIMM_BLOCK_KEY.match(key))})
    blocks = []
    for _, _, prefix in prefixes:
        has = {name for name in ("conv_pw", "conv_dw", "conv_pwl") if f"{prefix}.{name}.weight" in timm_keys}
        if has == {"conv_pw", "conv_dw", "conv_pwl"}:
            blocks.append((prefix, "inverted_residual"))
        elif has == {"conv_pw", "conv_dw"}:
            blocks.append((prefix, "depthwise_separable"))
        else:  # e.g. EfficientNetV2's EdgeResidual: no rules, and no later block may be numbered past it
            return []
    return blocks


def create_timm_model(config: VisionConfig) -> nn.Module:
    """``timm.create_model`` from the config; never touches the hub unless ``pretrained``."""
    kwargs: dict[str, Any] = dict(config.model_kwargs)
    if config.image_size is not None:
        if "img_size" in kwargs:
            raise ValueError(f"VisionConfig sets image_size={config.image_size} and model_kwargs img_size="
                             f"{kwargs['img_size']}; set only one")
        pretrained_cfg = get_pretrained_cfg(config.model)
        # only fixed-size architectures (position tables) take img_size; CNNs accept any size as is
        if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
            kwargs["img_size"] = config.image_size
    try:
        return timm.create_model(config.model, pretrained=config.pretrained, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {config.model!r} rejected model_kwargs {sorted(kwargs)}: {err}") from err
    except RuntimeError as err:
        if str(err).startswith("Unknown model"):
            raise unknown_model_error("timm", config.model, timm.list_models(),
                                      hint="list them with timm.list_models('*pattern*')") from None
        raise


def timm_transform(model: nn.Module, *, image_size: int) -> ImageTransform:
    """Eval transform with the model's own mean, std and interpolation, at ``image_size``."""
    data_config = resolve_model_data_config(model)
    # crop_pct 1.0: resize the short side to image_size and centre-crop, keeping the whole short side
    # (timm's default 0.875-0.95 crops away content a caption may talk about)
    data_config.update(input_size=(3, image_size, image_size), crop_pct=1.0)
    pipeline = create_transform(**data_config, is_training=False)
    return ImageTransform(pipeline, image_size=image_size, mean=data_config["mean"], std=data_config["std"])


def _model_image_size(model: nn.Module, name: str) -> int:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)  # what a ViT was really built for
    if size is None:
        size = model.pretrained_cfg["input_size"][-2:]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise ValueError(f"timm model {name!r} expects {height}x{width} images; only square inputs are supported")
    return int(height)
