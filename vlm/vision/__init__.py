"""Pluggable vision encoders: ``build_vision_encoder(VisionConfig(name=..., model=...))``.

Importing this package registers the built-in encoders ``timm``, ``open_clip`` and ``hf_vit``
(Hugging Face CLIP/SigLIP layout). Modules: ``base``
(config, encoder contract, registry), ``transform`` (``ImageTransform``), ``augment`` (train-time
augmentation), ``checkpoint`` (reading and loading weights), ``timm``, ``open_clip``, ``hf_vit``.
"""

from vlm.vision.augment import AugmentConfig, augmented_transform
from vlm.vision.base import VisionConfig, VisionEncoder, build_vision_encoder, list_encoders, register
from vlm.vision.checkpoint import load_state_dict_checked, read_state_dict, resolve_checkpoint_path
from vlm.vision.hf_vit import HFVisionEncoder
from vlm.vision.open_clip import OpenClipEncoder
from vlm.vision.timm import TimmEncoder
from vlm.vision.transform import ImageTransform

__all__ = [
    "AugmentConfig",
    "HFVisionEncoder",
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
