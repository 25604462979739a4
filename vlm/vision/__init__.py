"""Pluggable vision encoders: ``build_vision_encoder(VisionConfig(name=..., model=...))``.

Importing this package registers the built-in encoders ``timm`` and ``open_clip``.
"""

from vlm.vision.base import (ImageTransform, VisionConfig, VisionEncoder, build_vision_encoder,
                             list_encoders, load_state_dict_checked, read_state_dict, register)
from vlm.vision.open_clip import OpenClipEncoder
from vlm.vision.timm import TimmEncoder

__all__ = [
    "ImageTransform",
    "OpenClipEncoder",
    "TimmEncoder",
    "VisionConfig",
    "VisionEncoder",
    "build_vision_encoder",
    "list_encoders",
    "load_state_dict_checked",
    "read_state_dict",
    "register",
]
