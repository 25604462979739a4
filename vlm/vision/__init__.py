"""Pluggable vision encoders: ``build_vision_encoder(VisionConfig(name=..., model=...))``.

Importing this package registers the built-in encoders ``timm`` and ``open_clip``.
"""

from vlm.vision.base import (AugmentConfig, ImageTransform, VisionConfig, VisionEncoder, augmented_transform,
                             build_vision_encoder, list_encoders, load_state_dict_checked, read_state_dict,
                             register, resolve_checkpoint_path)
from vlm.vision.open_clip import OpenClipEncoder
from vlm.vision.timm import TimmEncoder

__all__ = [
    "AugmentConfig",
    "ImageTransform",
    "OpenClipEncoder",
    "TimmEncoder",
    "VisionConfig",
    "VisionEncoder",
    "augmented_transform",
    "build_vision_encoder",
    "list_encoders",
    "load_state_dict_checked",
    "read_state_dict",
    "register",
    "resolve_checkpoint_path",
]
