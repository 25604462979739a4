"""Rotary position embeddings in the "rotate half" layout of Hugging Face Llama checkpoints, and
the ways of stretching them to longer contexts.

Meta checkpoints use the interleaved layout; `vlm.checkpoints` permutes their q/k projections on
load so that one implementation serves both.

Scaling methods (`LlamaConfig.rope_scaling`, a dict with `type` in YAML):
- `linear` (Position Interpolation): every frequency divided by `factor`.
- `dynamic` (NTK-aware): theta raised with the current length once it passes the model's
  `max_seq_len`; recomputed per forward call from the largest position.
- `yarn`: frequencies blended between interpolation and extrapolation by a ramp over the
  dimensions (`beta_fast`, `beta_slow`), and cos/sin multiplied by an attention factor (mscale).
- `llama3` (`RopeScaling`, also when `type` is absent): long wavelengths slowed by `factor`, short
  ones kept, the band between smoothly blended.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Union

import torch


def _check_type_and_factor(scaling: object, kind: str) -> None:
    if scaling.type != kind:
        raise ValueError(f"{type(scaling).__name__} is rope_scaling type {kind!r}, got type {scaling.type!r}")
    if not scaling.factor >= 1.0:
        raise ValueError(f"rope_scaling.factor must be >= 1 for type {kind!r}, got {scaling.factor}")


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling (`type: llama3`): long wavelengths are slowed by `factor`, short
    ones kept, and the band between `high_freq_factor` and `low_freq_factor` is interpolated smoothly.
    A config without `type` is llama3 scaling (as before the other methods existed)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    type: Literal["llama3"] = field(default="llama3", kw_only=True)

    def __post_init__(self) -> None:
        _check_type_and_factor(self, "llama3")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be positive")


Llama3Scaling = RopeScaling


@dataclass
class LinearScaling:
    """Position Interpolation: positions (equivalently, frequencies) divided by `factor`."""

    type: Literal["linear"] = field(default="linear", kw_only=True)
    factor: float = 2.0

    def __post_init__(self) -> None:
        _check_type_and_factor(self, "linear")


@dataclass
class DynamicScaling:
    """Dynamic NTK: for a sequence of length L > max_seq_len, theta is multiplied by
    ((factor * L / max_seq_len) - (factor - 1)) ** (d / (d - 2)); unchanged up to max_seq_len."""

    type: Literal["dynamic"] = field(default="dynamic", kw_only=True)
    factor: float = 2.0

    def __post_init__(self) -> None:
        _check_type_and_factor(self, "dynamic")


@dataclass
class YarnScaling:
    """YaRN. `attention_factor` None: 0.1 ln(factor) + 1, or the ratio of that with `mscale` and
    with `mscale_all_dim` when both are set (DeepSeek's form). `truncate` rounds the ramp's ends."""

    type: Literal["yarn"] = field(default="yarn", kw_only=True)
    factor: float = 4.0
    original_max_position_embeddings: int = 2048
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        _check_type_and_factor(self, "yarn")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be positive")
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"rope_scaling needs beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ValueError(f"rope_scaling.attention_factor must be positive, got {self.attention_factor}")


AnyRopeScaling = Union[RopeScaling, LinearScaling, DynamicScaling, YarnScaling]
_BY_TYPE: dict[str, type] = {
    "llama3": RopeScaling, "linear": LinearScaling, "dynamic": DynamicScaling, "yarn": YarnScaling,
}


def rope_scaling_type(scaling: AnyRopeScaling | None) -> str:
    """`default`, `linear`, `dynamic`, `yarn` or `llama3`."""
    return "default" if scaling is None else scaling.type


def rope_scaling_from_dict(values: dict | AnyRopeScaling | None) -> AnyRopeScaling | None:
    """The scaling dataclass for `{type: ..., factor: ..., ...}` (`rope_type` is accepted for
    `type`; no type means llama3). Unknown types and keys are errors naming the known ones."""
    if values is None or not isinstance(values, dict):
        return values
    values = dict(values)
    kinds = {values.pop("type", None), values.pop("rope_type", None)} - {None}
    if len(kinds) > 1:
        raise ValueError(f"rope_scaling has both type and rope_type, and they differ: {sorted(kinds)}")
    kind = kinds.pop() if kinds else "llama3"
    if kind not in _BY_TYPE:
        raise ValueError(f"rope_scaling.type {kind!r} is not one of {sorted(_BY_TYPE)}")
    cls = _BY_TYPE[kind]
    known = {f.name for f in dataclasses.fields(cls)} - {"type"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"rope_scaling of type {kind!r}: unknown keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def rope_scaling_to_dict(scaling: AnyRopeScaling) -> dict:
    """`{type: ..., <parameters>}`, the inverse of `rope_scaling_from_dict`."""
    return {"type": rope_scaling_type(scaling), **{k: v for k, v in vars(scaling).items() if k != "type"}}


def _base_frequencies(head_dim: int, theta: float, device: torch.device | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    # Between the two wavelengths, blend the slowed and original frequency.
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn(inv_freq: torch.Tensor, s: YarnScaling, head_dim: int, theta: float) -> torch.Tensor:
    def dimension_of(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        wavelengths = s.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(wavelengths) / (2 * math.log(theta))

    low, high = dimension_of(s.beta_fast), dimension_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    # ramp 0 (high frequencies): keep (extrapolate); ramp 1 (low frequencies): divide by factor (interpolate).
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def _dynamic_theta(theta: float, s: DynamicScaling, head_dim: int, *, seq_len: int, max_seq_len: int) -> float:
    seq_len = max(seq_len, max_seq_len)
    return theta * ((s.factor * seq_len / max_seq_len) - (s.factor - 1)) ** (head_dim / (head_dim - 2))


def inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: AnyRopeScaling | None = None,
    *,
    device: torch.device | None = None,
    seq_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The `head_dim // 2` rotation frequencies, in float32, scaled by `scaling` if given.

    Dynamic scaling needs `seq_len` (the current length: largest position + 1) and `max_seq_len`
    (the length the model was trained at); the others ignore them."""
    kind = rope_scaling_type(scaling)
    if kind == "dynamic":
        if seq_len is None or max_seq_len is None:
            raise ValueError("dynamic RoPE scaling needs seq_len and max_seq_len")
        theta = _dynamic_theta(theta, scaling, head_dim, seq_len=seq_len, max_seq_len=max_seq_len)
    inv_freq = _base_frequencies(head_dim, theta, device)
    if kind == "linear":
        return inv_freq / scaling.factor
    if kind == "yarn":
        return _yarn(inv_freq, scaling, head_dim, theta)
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def attention_scaling(scaling: AnyRopeScaling | None) -> float:
    """The factor cos and sin are multiplied by (so attention logits by its square): YaRN's mscale,
    1 for every other method."""
    if rope_scaling_type(scaling) != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(m: float) -> float:
        return 1.0 if scaling.factor <= 1 else 0.1 * m * math.log(scaling.factor) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.mscale) / mscale(scaling.mscale_all_dim)
    return mscale(1.0)


class RotaryTables:
    """cos/sin for a model's RoPE, times the method's attention scaling.

    Given `limit` (a bound on the positions known on the host: the cache slots in use), cos and sin
    are rows of a table of every position below it, grown by doubling, so a decoding step gathers
    instead of recomputing and never syncs. Dynamic scaling depends on the longest position, so it
    reads it (one host sync per call) and computes its tables afresh."""

    def __init__(self, head_dim: int, theta: float, scaling: AnyRopeScaling | None, *, max_seq_len: int) -> None:
        self.head_dim, self.theta, self.scaling, self.max_seq_len = head_dim, theta, scaling, max_seq_len
        self.scale = attention_scaling(scaling)
        self._inv_freq: torch.Tensor | None = None
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # float32 cos, sin [N, head_dim]

    def inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        if rope_scaling_type(self.scaling) == "dynamic":
            seq_len = int(positions.max()) + 1 if positions.numel() else 1
            return inverse_frequencies(self.head_dim, self.theta, self.scaling, device=positions.device,
                                       seq_len=seq_len, max_seq_len=self.max_seq_len)
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling, device=positions.device)
            self._table = None
        return self._inv_freq

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype, *, limit: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (all below `limit` when given) -> cos, sin [B, T, head_dim] in `dtype`."""
        inv_freq = self.inv_freq(positions)
        if limit is None or rope_scaling_type(self.scaling) == "dynamic":
            return rope_cos_sin(positions, inv_freq, dtype, scale=self.scale)
        if self._table is None or self._table[0].shape[0] < limit:
            size = max(limit, 2 * self._table[0].shape[0] if self._table is not None else 0)
            rows = torch.arange(size, device=inv_freq.device)[None]
            self._table = tuple(t[0] for t in rope_cos_sin(rows, inv_freq, torch.float32, scale=self.scale))
        cos, sin = self._table
        return cos[positions].to(dtype), sin[positions].to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, *, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [B, T, head_dim] for integer positions [B, T], computed in float32 and
    multiplied by `scale` (YaRN's attention scaling)."""
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    if scale == 1.0:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by the tables [B, T, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
