"""The visual tower of an open_clip model as a vision encoder (patch tokens, not the pooled embedding).

Only the visual tower is built. ``VisionConfig.model`` is an open_clip model name
(``open_clip.list_models()``) or a JSON file in open_clip's format (a ``model_configs/*.json``, or
an ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``). ``model_kwargs`` overrides
that config: ``embed_dim``, ``quick_gelu``, ``vision_cfg`` (merged key by key) and
``preprocess_cfg`` (mean, std, interpolation, resize_mode, ... for weights trained with other ones).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transform import PreprocessCfg
from torch import nn

from vlm.vision.base import VisionConfig, VisionEncoder, register, unknown_model_error
from vlm.vision.checkpoint import load_state_dict_checked, read_state_dict
from vlm.vision.transform import ImageTransform

_MODEL_KWARGS = ("embed_dim", "quick_gelu", "vision_cfg", "preprocess_cfg")
_VISUAL_PREFIX = "visual."  # full open_clip checkpoints hold the image tower under this prefix


@register("open_clip")
class OpenClipEncoder(VisionEncoder):
    """Tokens ``[B, N, D]`` from block ``feature_layer`` of an open_clip visual tower.

    The tower is pruned after that block where the library allows it (open_clip's ViT, timm
    trunks): later blocks, final norm and projection are removed. ``N`` is the class token (if kept)
    plus the patches, row-major.

    Args:
        visual: an open_clip visual tower with ``forward_intermediates`` (pruned in place).
        feature_layer: block index; negative counts from the end.
        keep_prefix_tokens: keep the class token in front of the patch tokens.
        image_size: square input side of the tower.
        transform: PIL image -> normalised FloatTensor [3, image_size, image_size].
    """

    def __init__(self, visual: nn.Module, *, feature_layer: int = -2, keep_prefix_tokens: bool = False,
                 image_size: int, transform: ImageTransform) -> None:
        super().__init__()
        if not hasattr(visual, "forward_intermediates"):
            raise ValueError(f"open_clip tower {type(visual).__name__} has no forward_intermediates")
        full_keys = set(visual.state_dict())
        try:
            self._indices = _prune_after(visual, feature_layer)
        except AssertionError as err:  # open_clip's / timm's range check
            raise ValueError(f"feature_layer={feature_layer} does not exist in {type(visual).__name__}: "
                             f"{err}") from err
        self._unused_keys = frozenset(full_keys - set(visual.state_dict()))
        self.visual = visual
        self.feature_layer = feature_layer
        self.keep_prefix_tokens = keep_prefix_tokens
        self.image_size = image_size
        self.transform = transform
        try:
            self.num_tokens, self.dim = self.probe_output_shape()
        except AssertionError as err:  # the libraries check layer range and input size with asserts
            raise ValueError(f"{type(visual).__name__} rejects feature_layer={feature_layer} or "
                             f"image_size={image_size}: {err}") from err

    @classmethod
    def from_config(cls, config: VisionConfig) -> OpenClipEncoder:
        if config.pretrained:
            raise ValueError("open_clip weights are chosen by tag and downloaded; for open_clip set "
                             "checkpoint_path to a local checkpoint instead of pretrained=True")
        model_cfg, preprocess = resolve_open_clip_config(config)
        vision_cfg = model_cfg["vision_cfg"]
        if vision_cfg.get("patch_dropout", 0.0):
            raise ValueError("open_clip patch_dropout changes the token count in training; set it to 0")
        try:
            vision_cfg = CLIPVisionCfg(**vision_cfg)
        except TypeError as err:
            raise ValueError(f"open_clip vision_cfg for {config.model!r} is invalid: {err}") from err
        quick_gelu = model_cfg.get("quick_gelu", False)
        visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)
        image_size = _square_size(vision_cfg.image_size, config.model)
        if hasattr(visual, "set_input_size"):  # a timm trunk is built at its own size, not image_size
            visual.set_input_size(image_size)
        preprocess = dataclasses.replace(preprocess, size=image_size)
        return cls(visual, feature_layer=config.feature_layer, keep_prefix_tokens=config.keep_prefix_tokens,
                   image_size=image_size, transform=open_clip_transform(preprocess))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        extra = {"output_extra_tokens": True} if self.keep_prefix_tokens else {}
        out = self.visual.forward_intermediates(
            pixels, indices=self._indices, stop_early=True, intermediates_only=True, output_fmt="NCHW", **extra)
        tokens = out["image_intermediates"][0].flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        prefix = out.get("image_intermediates_prefix")
        if prefix:
            tokens = torch.cat([prefix[0], tokens], dim=1)  # [B, 1 + h*w, D]
        return tokens.contiguous()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a full open_clip checkpoint (``visual.*`` keys are used) or a visual-only state dict."""
        state = read_state_dict(path)
        if any(key.startswith(_VISUAL_PREFIX) for key in state):
            state = {k[len(_VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(_VISUAL_PREFIX)}
        load_state_dict_checked(self.visual, state, source=str(path), ignore=self._unused_keys)


def _prune_after(visual: nn.Module, feature_layer: int) -> list[int]:
    """Drop what follows block ``feature_layer``; returns the indices to ask intermediates for."""
    if hasattr(visual, "prune_intermediate_layers"):  # open_clip's own ViT
        return visual.prune_intermediate_layers([feature_layer], prune_norm=True, prune_head=True)
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel wraps a timm model
    if trunk is not None and hasattr(trunk, "prune_intermediate_layers"):
        indices = trunk.prune_intermediate_layers([feature_layer], prune_norm=True, prune_head=True)
        visual.head = nn.Identity()  # projection of the pooled output, unused for tokens
        return indices
    return [feature_layer]  # e.g. ModifiedResNet: nothing to prune, the probe checks the range


def resolve_open_clip_config(config: VisionConfig) -> tuple[dict[str, Any], PreprocessCfg]:
    """Model config (``embed_dim``, ``vision_cfg``, ...) and preprocessing, with overrides applied."""
    model_cfg, preprocess = _base_config(config.model)
    unknown = sorted(set(config.model_kwargs) - set(_MODEL_KWARGS))
    if unknown:
        raise ValueError(f"open_clip model_kwargs {unknown} do not affect the vision tower; allowed: {_MODEL_KWARGS}")
    overrides = copy.deepcopy(config.model_kwargs)
    preprocess_overrides = overrides.pop("preprocess_cfg", {})
    vision_overrides = overrides.pop("vision_cfg", {})
    if not isinstance(preprocess_overrides, dict) or not isinstance(vision_overrides, dict):
        raise ValueError("open_clip model_kwargs vision_cfg and preprocess_cfg must be dicts")
    if config.image_size is not None:
        if "image_size" in vision_overrides:
            raise ValueError(f"VisionConfig sets image_size={config.image_size} and model_kwargs vision_cfg "
                             f"image_size={vision_overrides['image_size']}; set only one")
        vision_overrides["image_size"] = config.image_size
    model_cfg["vision_cfg"] = {**model_cfg["vision_cfg"], **vision_overrides}
    model_cfg.update(overrides)
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    if set(preprocess_overrides) - known:
        raise ValueError(f"open_clip preprocess_cfg keys {sorted(set(preprocess_overrides) - known)} are unknown; "
                         f"allowed: {sorted(known)}")
    if "embed_dim" not in model_cfg:
        raise ValueError(f"open_clip config for {config.model!r} has no embed_dim")
    return model_cfg, dataclasses.replace(preprocess, **preprocess_overrides)


def _base_config(model: str) -> tuple[dict[str, Any], PreprocessCfg]:
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {path}")
        data = json.loads(path.read_text())
        # open_clip_config.json (hub layout) nests the model config and carries preprocessing
        model_cfg = data.get("model_cfg", data)
        known = {f.name for f in dataclasses.fields(PreprocessCfg)}
        preprocess = PreprocessCfg(**{k: v for k, v in data.get("preprocess_cfg", {}).items() if k in known})
    elif ":" in model:  # hf-hub:org/repo would download; local-dir: lacks the preprocessing
        raise ValueError(f"open_clip model {model!r}: pass a model name or the path of a local "
                         "open_clip_config.json (no hub access)")
    else:
        model_cfg = open_clip.get_model_config(model)
        if model_cfg is None:
            raise unknown_model_error("open_clip", model, open_clip.list_models(),
                                      hint="list them with open_clip.list_models(), or pass a .json config")
        preprocess = PreprocessCfg()
    if "vision_cfg" not in model_cfg:
        raise ValueError(f"open_clip config {model!r} has no vision_cfg")
    return copy.deepcopy(model_cfg), preprocess


def open_clip_transform(preprocess: PreprocessCfg) -> ImageTransform:
    """open_clip's eval preprocessing (resize, centre crop, normalise) for ``preprocess``."""
    pipeline = open_clip.image_transform(
        preprocess.size, is_train=False, mean=preprocess.mean, std=preprocess.std,
        resize_mode=preprocess.resize_mode, interpolation=preprocess.interpolation,
        fill_color=preprocess.fill_color)
    return ImageTransform(pipeline, image_size=int(preprocess.size), mean=preprocess.mean, std=preprocess.std)


def _square_size(size: int | tuple[int, int] | list[int], model: str) -> int:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise ValueError(f"open_clip model {model!r} expects {height}x{width} images; only square inputs are supported")
    return int(height)
