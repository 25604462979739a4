"""Import and export Llama weights in Hugging Face and Meta layouts, one module per layout.

- `vlm.checkpoints.hf`: `config.json` + `model.safetensors` (or shards listed in
  `model.safetensors.index.json`). Same rotary layout as ours; only names differ.
- `vlm.checkpoints.meta`: `params.json` + `consolidated.*.pth`, loaded with `weights_only=True`.
  Their rotary layout interleaves the two halves of each head, so q/k rows are permuted on load.
- `vlm.checkpoints.llava_hf`: a whole LLaVA model in `transformers`' llava-hf layout
  (`LlavaForConditionalGeneration`), read by `vlm.load_model` and written by
  `vlm export --format transformers`; `vlm.checkpoints.llava_tokenizer` converts a LLaVA-1.5 /
  Llama 2 tokenizer to vlm's special-token names.

Nothing here unpickles arbitrary objects: torch files are read with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlm.checkpoints.common import load_state_exact
from vlm.checkpoints.hf import _read_hf, config_from_hf, config_to_hf, hf_to_ours, ours_to_hf, save_llama_hf
from vlm.checkpoints.meta import _read_meta, config_from_meta, hf_to_meta_rotary, meta_to_hf_rotary, save_llama_meta
from vlm.text.llama import Llama
from vlm.text.rope import RopeScaling

__all__ = ["config_from_hf", "config_from_meta", "config_to_hf", "hf_to_meta_rotary", "hf_to_ours", "load_llama",
           "load_state_exact", "meta_to_hf_rotary", "ours_to_hf", "save_llama_hf", "save_llama_meta"]


def load_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    rope_scaling_factor: float | None = None,
) -> Llama:
    """Load a Llama from a Hugging Face directory or a Meta directory (detected by its files).

    `rope_scaling_factor` overrides the Llama 3 RoPE factor of the checkpoint; Meta's params.json
    often leaves it out and gets a guess (see `config_from_meta`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory holding a Llama checkpoint")
    if (path / "config.json").exists():
        config, state = _read_hf(path)
        if rope_scaling_factor is not None:
            scaling = dataclasses.replace(config.rope_scaling or RopeScaling(), factor=rope_scaling_factor)
            config = dataclasses.replace(config, rope_scaling=scaling)
    elif (path / "params.json").exists():
        config, state = _read_meta(path, rope_scaling_factor=rope_scaling_factor)
    else:
        raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")
    with torch.device("meta"):
        model = Llama(config)
    load_state_exact(model, state, source=str(path))
    return model.to(device=device, dtype=dtype)
