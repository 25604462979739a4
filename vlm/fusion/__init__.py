"""Fusion modules: how image features enter the text model. Select one by name in FusionConfig.

Importing this package registers the built-in fusions `llava` (early) and `flamingo` (deep).
"""

from vlm.fusion.base import Fusion, FusionConfig, build_fusion, list_fusions, register
from vlm.fusion.flamingo import FlamingoFusion, FlamingoOptions
from vlm.fusion.llava import LlavaFusion, LlavaOptions

__all__ = [
    "FlamingoFusion", "FlamingoOptions", "Fusion", "FusionConfig", "LlavaFusion", "LlavaOptions",
    "build_fusion", "list_fusions", "register",
]
