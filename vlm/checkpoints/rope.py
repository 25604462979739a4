"""RoPE scaling in the checkpoint layouts: Hugging Face's `rope_scaling` / `rope_parameters` dicts
and Meta's `params.json` keys, to and from the dataclasses of `vlm.text.rope`.

Hugging Face: `{"rope_type": "linear" | "dynamic" | "yarn" | "llama3", "factor": ..., ...}` under
`rope_scaling` (transformers 4.x) or `rope_parameters` (5.x, which also holds `rope_theta`).
Meta: llama3 scaling as `use_scaled_rope` (+ `rope_scaling_factor`, `high_freq_factor`); Meta
has no key for the other methods, so they are written as a `rope_scaling` object
(`{"type": "yarn", ...}`) that `load_llama` reads back and Meta's own code ignores.
"""

from __future__ import annotations

from vlm.checkpoints.common import _require
from vlm.errors import UserError
from vlm.text.rope import AnyRopeScaling, rope_scaling_from_dict, rope_scaling_to_dict, rope_scaling_type

_HF_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Keys of a Hugging Face rope dict that are not scaling parameters.
_HF_NOT_SCALING = ("rope_type", "type", "rope_theta")


def rope_scaling_from_hf(hf: dict, *, source: str = "config.json") -> AnyRopeScaling | None:
    """The scaling of a Hugging Face config dict (None for plain RoPE); UserError naming `source`
    for an unsupported type, a missing parameter or an unknown one."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise UserError(f"{source}: rope_scaling / rope_parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind not in _HF_REQUIRED:
        raise UserError(f"{source}: rope scaling type {kind!r} is not supported (supported: {sorted(_HF_REQUIRED)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{source}: partial_rotary_factor {params['partial_rotary_factor']} is not supported")
    values = {k: v for k, v in params.items() if k not in (*_HF_NOT_SCALING, "partial_rotary_factor") and v is not None}
    if kind == "yarn":  # transformers' defaults: the model's length, and factor as the ratio of the two
        length = hf.get("max_position_embeddings", 2048)
        values.setdefault("original_max_position_embeddings", length)
        values.setdefault("factor", length / values["original_max_position_embeddings"])
    _require(values, _HF_REQUIRED[kind], source, where=" in rope_scaling / rope_parameters")
    try:
        return rope_scaling_from_dict({"type": kind, **values})
    except (ValueError, TypeError) as error:
        raise UserError(f"{source}: {error}") from None


def rope_scaling_to_hf(scaling: AnyRopeScaling | None) -> dict | None:
    """The Hugging Face `rope_scaling` dict (None for plain RoPE); unset optional values are left out."""
    if scaling is None:
        return None
    values = rope_scaling_to_dict(scaling)
    kind = values.pop("type")
    if values.get("truncate") is True:
        del values["truncate"]  # the default; older transformers do not know the key
    return {"rope_type": kind, **{k: v for k, v in values.items() if v is not None}}


def rope_parameters_to_hf(scaling: AnyRopeScaling | None, theta: float) -> dict:
    """transformers 5.x's `rope_parameters`: the scaling dict with `rope_theta` (type `default` without one)."""
    return {**(rope_scaling_to_hf(scaling) or {"rope_type": "default"}), "rope_theta": theta}


# --- Meta params.json ---------------------------------------------------------------------------

# llama-models fixes these two for llama3 scaling; params.json has no key for them.
_META_LLAMA3_FIXED = {"low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def rope_scaling_to_meta(scaling: AnyRopeScaling | None) -> dict:
    """The params.json entries for `scaling` (none for plain RoPE)."""
    kind = rope_scaling_type(scaling)
    if kind == "default":
        return {}
    if kind != "llama3":
        return {"rope_scaling": rope_scaling_to_dict(scaling)}
    fixed = {k: getattr(scaling, k) for k in _META_LLAMA3_FIXED}
    if fixed != _META_LLAMA3_FIXED:
        raise ValueError(
            "Meta's params.json fixes low_freq_factor=1 and original_max_position_embeddings=8192; "
            f"this model has {scaling.low_freq_factor} and {scaling.original_max_position_embeddings}"
        )
    return {"use_scaled_rope": True, "rope_scaling_factor": scaling.factor,
            "high_freq_factor": scaling.high_freq_factor}


def rope_scaling_object_from_meta(params: dict, *, source: str) -> AnyRopeScaling | None:
    """The `rope_scaling` object of a params.json written by `save_llama_meta` (None when absent)."""
    values = params.get("rope_scaling")
    if values is None:
        return None
    if not isinstance(values, dict):
        raise UserError(f'{source}: rope_scaling must be an object like {{"type": "yarn", "factor": 4}}, '
                        f"got {values!r}")
    try:
        return rope_scaling_from_dict(values)
    except (ValueError, TypeError) as error:
        raise UserError(f"{source}: {error}") from None
