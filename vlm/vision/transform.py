"""``ImageTransform``: PIL image -> normalised ``[3, S, S]`` tensor for one encoder, and its resize in words."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ImageTransform:
    """PIL image (any mode, any size) -> FloatTensor [3, S, S], normalised for one encoder.

    Wraps the library's own eval pipeline, or an augmented one (``random``); a plain class so that
    DataLoader workers can pickle it.
    """

    def __init__(self, pipeline: Callable[[Any], torch.Tensor], *, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], random: bool = False) -> None:
        self.pipeline = pipeline
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._random = bool(random)

    @property
    def random(self) -> bool:
        """True when one image may give different tensors (an augmented pipeline): not cacheable."""
        return self._random

    def __call__(self, image: Any) -> torch.Tensor:
        # grey, palette and RGBA images would otherwise reach the normaliser with 1 or 4 channels
        return self.pipeline(image.convert("RGB"))

    @property
    def resize(self) -> str:
        """How an image of another size becomes S x S, in words ("resized so its short side is 224
        (bicubic), then centre-cropped to 224x224"), read from the pipeline's own steps."""
        steps = [_describe_step(step) for step in getattr(self.pipeline, "transforms", [self.pipeline])]
        steps = [step for step in steps if step]
        return ", then ".join(steps) if steps else f"resized to {self.image_size}x{self.image_size}"

    def __repr__(self) -> str:
        random = ", random=True" if self.random else ""
        return f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}{random})"


def _describe_step(step: Any) -> str | None:
    """Words for one resize or crop step of a torchvision / timm / open_clip eval pipeline, else None."""
    kind, size = type(step).__name__, getattr(step, "size", None)
    interpolation = getattr(step, "interpolation", None)
    how = f" ({getattr(interpolation, 'value', interpolation)})" if interpolation is not None else ""
    sides = [size] if isinstance(size, int) else list(size) if isinstance(size, (tuple, list)) else []
    square = "x".join(map(str, sides * 2 if len(sides) == 1 else sides[::-1]))  # torchvision sizes are (h, w)
    if kind == "Resize" and len(sides) == 1:
        return f"resized so its short side is {sides[0]}{how}"
    if kind == "Resize" and sides:
        return f"stretched to {square}{how}, not keeping its aspect ratio"
    if kind == "ResizeKeepRatio" and sides:
        side = "long" if getattr(step, "longest", 0) >= 0.5 else "short"
        return f"resized so its {side} side is {max(sides) if side == 'long' else min(sides)}{how}"
    if kind == "CenterCrop" and sides:
        return f"centre-cropped to {square}"
    if kind == "CenterCropOrPad" and sides:
        return f"centre-cropped or padded to {square}"
    return None
