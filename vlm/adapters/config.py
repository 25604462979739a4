"""LoRAConfig: which linears get a low-rank adapter, and its shape."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlm.stages import PARTS

QUANTIZATIONS = ("nf4",)
# Every linear of the Llama blocks (the QLoRA paper adapts all of them); the lm head stays as is.
DEFAULT_TARGETS = ["*.attention.wq", "*.attention.wk", "*.attention.wv", "*.attention.wo", "*.feed_forward.*"]


@dataclass
class LoRAConfig:
    """Adapters on the `nn.Linear` modules of `parts` whose full names match any glob of `targets`.

    - `rank`, `alpha`: each adapted linear computes base(x) + B A dropout(x) * alpha / rank.
    - `targets`: `fnmatch` globs over module names as `model.named_modules()` gives them, part
      prefix included (`text.layers.0.attention.wq`, `fusion.blocks.1.to_q`); `*` crosses dots.
    - `parts`: top-level submodules of the model that may be adapted (`text`, `vision`, `fusion`).
    - `use_dora`: weight-decomposed LoRA (a trained magnitude per output feature).
    - `quantize_base`: `"nf4"` stores the adapted linears' frozen weights in torchao's NF4 (QLoRA).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    parts: list[str] = field(default_factory=lambda: ["text"])
    use_dora: bool = False
    quantize_base: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.parts, tuple):
            self.parts = list(self.parts)
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
               "rank", "a positive integer", self.rank)
        _check(_is_number(self.alpha) and self.alpha > 0, "alpha", "a positive number", self.alpha)
        _check(_is_number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)", self.dropout)
        _check(_is_string_list(self.targets), "targets", "a non-empty list of glob strings", self.targets)
        distinct_parts = _is_string_list(self.parts) and len(set(self.parts)) == len(self.parts)
        _check(distinct_parts and set(self.parts) <= set(PARTS),
               "parts", f"a non-empty list of distinct names from {list(PARTS)}", self.parts)
        _check(isinstance(self.use_dora, bool), "use_dora", "true or false", self.use_dora)
        _check(self.quantize_base is None or self.quantize_base in QUANTIZATIONS,
               "quantize_base", f"null or one of {list(QUANTIZATIONS)}", self.quantize_base)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAConfig:
        """Build from a dict (a YAML section), refusing keys that are not fields."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown LoRAConfig keys {unknown}; known keys: {known}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"LoRAConfig.{name} must be {expected}, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_string_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
