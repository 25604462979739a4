"""The fusion contract and its registry.

A fusion decides how image features enter the text model. `vlm.model` calls, per forward:

    state = fusion.prepare(features, batch, state)   # features [N, Nv, Dv] or None
    h = fusion.embed(h, state)                       # after the token embedding
    h = fusion.before_layer(i, h, state)             # before each decoder layer i

`state` is the fusion's own object. During cached decoding `prepare` is called again for each new
chunk of tokens with `features=None` and the previous state, which it advances.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from vlm.text.llama import LlamaConfig


class FusionBatch(Protocol):
    """What a fusion reads from a batch (the data layer's `Batch` satisfies it)."""

    input_ids: torch.Tensor  # [B, T]
    image_sample_index: torch.Tensor | None  # [N]: the row each image belongs to


@dataclass
class FusionConfig:
    """`name` picks the registered fusion; `options` go to that fusion's own options dataclass."""

    name: str = "llava"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in _REGISTRY:
            raise ValueError(f"unknown fusion {self.name!r}; registered: {list_fusions()}")
        self.parsed_options()  # validate now, not at build time

    def parsed_options(self) -> Any:
        options_cls = _REGISTRY[self.name].Options
        known = {f.name for f in dataclasses.fields(options_cls)}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ValueError(f"fusion {self.name!r}: unknown options {unknown}; known: {sorted(known)}")
        return options_cls(**self.options)


class Fusion(nn.Module):
    """Base class: subclasses define `Options` (a dataclass) and override the three hooks."""

    Options: type = object

    def __init__(self, options: Any, *, text: LlamaConfig, vision_dim: int, vision_tokens: int, image_token_id: int) -> None:
        super().__init__()
        self.options = options
        self.text_dim = text.dim
        self.image_token_id = image_token_id

    @property
    def tokens_per_image(self) -> int:
        """How many `<|image|>` placeholder tokens one image occupies in the text."""
        raise NotImplementedError

    def check(self, batch: FusionBatch) -> None:
        """Refuse a batch this fusion cannot run (e.g. placeholders that do not match the images)
        with a clear ValueError. The model calls it before `prepare`, outside compiled code: checks
        that read tensor values sync with the host, so they are kept out of the hooks below, which
        stay free of data-dependent control flow and compile without graph breaks."""

    def prepare(self, features: torch.Tensor | None, batch: FusionBatch, state: Any = None) -> Any:
        raise NotImplementedError

    def prepare_blank(self, features: torch.Tensor, batch: FusionBatch) -> Any:
        """State for a batch without images, from the features [1, Nv, Dv] of a blank image that
        belongs to no row: every parameter the fusion uses for images takes part, with exactly zero
        effect on the text. Sharded multi-rank runs need it so that all ranks run the same
        collectives when only some have images."""
        raise NotImplementedError(f"{type(self).__name__} does not support batches without images on some ranks")

    def embed(self, h: torch.Tensor, state: Any) -> torch.Tensor:
        return h

    def before_layer(self, index: int, h: torch.Tensor, state: Any) -> torch.Tensor:
        return h

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this fusion adds (trained in every stage)."""
        return self.parameters()


FusionT = TypeVar("FusionT", bound=type[Fusion])
_REGISTRY: dict[str, type[Fusion]] = {}


def register(name: str) -> Callable[[FusionT], FusionT]:
    """Class decorator: make a Fusion subclass selectable as `FusionConfig(name=name)`."""

    def decorator(cls: FusionT) -> FusionT:
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"fusion {name!r}: {cls.__name__}.Options must be a dataclass")
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"fusion {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_fusions() -> list[str]:
    return sorted(_REGISTRY)


def build_fusion(config: FusionConfig | Mapping, *, text: LlamaConfig, vision_dim: int, vision_tokens: int, image_token_id: int) -> Fusion:
    if isinstance(config, Mapping):
        config = FusionConfig(**config)
    cls = _REGISTRY[config.name]
    return cls(config.parsed_options(), text=text, vision_dim=vision_dim, vision_tokens=vision_tokens, image_token_id=image_token_id)


def num_images(batch: FusionBatch) -> int:
    """How many images `batch` brings: cached tower outputs when it has some, else pixel values
    (the same choice as `VisionLanguageModel.hidden`)."""
    for name in ("image_features", "pixel_values"):
        value = getattr(batch, name, None)
        if value is not None and value.shape[0] > 0:
            return value.shape[0]
    return 0


def check_image_rows(batch: FusionBatch, num_images: int) -> None:
    """For `Fusion.check`: a batch with images names a row of the batch for each of them (reads
    the index on the host; `images_per_row` cannot check it without a sync)."""
    if num_images == 0:
        return
    index, rows = batch.image_sample_index, batch.input_ids.shape[0]
    if index is None:
        raise ValueError("batch has images but no image_sample_index")
    if index.shape != (num_images,) or not bool(((index >= 0) & (index < rows)).all()):
        raise ValueError(f"image_sample_index {index.tolist()} must give each of the {num_images} images a row "
                         f"of the batch's {rows}")


def images_per_row(batch: FusionBatch, num_images: int) -> torch.Tensor:
    """[B] number of images of each row, from `image_sample_index`.

    A scatter-add of ones rather than `bincount`: its output size is the number of rows, not the
    largest index, so the shape is static and the op compiles without a graph break. An index
    outside [0, B) is left to `Fusion.check` (scatter_add would fail on it)."""
    rows = batch.input_ids.shape[0]
    counts = torch.zeros(rows, dtype=torch.long, device=batch.input_ids.device)
    if num_images == 0:
        return counts
    if batch.image_sample_index is None:
        raise ValueError("batch has images but no image_sample_index")
    index = batch.image_sample_index
    return counts.scatter_add(0, index, torch.ones_like(index))
