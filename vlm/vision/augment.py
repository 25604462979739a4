"""Train-time image augmentation: ``AugmentConfig`` (``VisionConfig.augment``), a random area crop,
and ``augmented_transform``, which puts the random steps in front of an encoder's eval transform."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchvision import transforms

from vlm.vision.transform import ImageTransform


@dataclasses.dataclass(kw_only=True)
class AugmentConfig:
    """Train-time augmentation; each default leaves the image as it is. Captions may name colours
    and left/right, so flips and colour changes are off unless asked for.

    Args:
        scale: ``[min, max]`` area fraction of the image that a random crop keeps (1.0: all of it).
            The crop, not resized, then goes through the eval transform (resize, centre crop).
        ratio: ``[min, max]`` aspect of the crop relative to the image's own, drawn log-uniformly
            (1.0 keeps the image's aspect; a crop never exceeds the image, so a ratio away from 1
            with scale 1 keeps less than the whole image).
        hflip: probability of a left-right flip.
        color_jitter: brightness, contrast and saturation strength s: each factor is drawn from
            ``[1 - s, 1 + s]``, in [0, 1].
        hue: hue shift of at most this fraction of the colour wheel, in [0, 0.5].
    """

    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = (1.0, 1.0)
    hflip: float = 0.0
    color_jitter: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        self.scale = _number_pair("scale", self.scale)
        self.ratio = _number_pair("ratio", self.ratio)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("VisionConfig.augment.scale must be [min, max] with 0 < min <= max <= 1, "
                             f"got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"VisionConfig.augment.ratio must be [min, max] with 0 < min <= max, "
                             f"got {list(self.ratio)}")
        for field, high in (("hflip", 1.0), ("color_jitter", 1.0), ("hue", 0.5)):
            value = getattr(self, field)
            if not (_is_number(value) and 0 <= value <= high):
                raise ValueError(f"VisionConfig.augment.{field} must be a number in [0, {high}], got {value!r}")
            setattr(self, field, float(value))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        """Build from a plain mapping (YAML/JSON); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"VisionConfig.augment: unknown keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**data)

    @property
    def is_identity(self) -> bool:
        """True when no option changes an image (then the train transform is the eval one)."""
        return self == AugmentConfig()


def _number_pair(field: str, value: Any) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ValueError(f"VisionConfig.augment.{field} must be a pair of numbers [min, max], got {value!r}")
    return float(value[0]), float(value[1])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class RandomAreaCrop:
    """PIL image -> a random crop of ``scale`` of its area and ``ratio`` times its aspect, not resized.

    Draws from the global torch RNG, so DataLoader worker seeding makes it reproducible.
    """

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
        self.scale, self.ratio = scale, ratio

    def __call__(self, image: Any) -> Any:
        width, height = image.size
        area = torch.empty(()).uniform_(*self.scale).item()
        aspect = math.exp(torch.empty(()).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).item())
        # width * height * area pixels, with (w / h) = aspect * (width / height); clamped to the image
        w = min(width, max(1, round(width * math.sqrt(area * aspect))))
        h = min(height, max(1, round(height * math.sqrt(area / aspect))))
        left = int(torch.randint(0, width - w + 1, ()).item())
        top = int(torch.randint(0, height - h + 1, ()).item())
        return image.crop((left, top, left + w, top + h))

    def __repr__(self) -> str:
        return f"RandomAreaCrop(scale={self.scale}, ratio={self.ratio})"


def augmented_transform(transform: ImageTransform, augment: AugmentConfig) -> ImageTransform:
    """``transform`` preceded by ``augment``'s random steps on the PIL image: same size, mean, std.

    Order: crop, flip, colour; then the eval steps (resize, centre crop, normalise) unchanged.
    """
    steps: list[Callable[[Any], Any]] = []
    if (augment.scale, augment.ratio) != ((1.0, 1.0), (1.0, 1.0)):
        steps.append(RandomAreaCrop(augment.scale, augment.ratio))
    if augment.hflip:
        steps.append(transforms.RandomHorizontalFlip(augment.hflip))
    if augment.color_jitter or augment.hue:
        strength = augment.color_jitter
        steps.append(transforms.ColorJitter(brightness=strength, contrast=strength, saturation=strength,
                                            hue=augment.hue))
    # flattened, so that ``resize`` still reads the eval steps
    steps.extend(getattr(transform.pipeline, "transforms", [transform.pipeline]))
    return ImageTransform(transforms.Compose(steps), image_size=transform.image_size, mean=transform.mean,
                          std=transform.std, random=True)
