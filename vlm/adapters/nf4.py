"""Frozen base weights in torchao's NF4 (the 4-bit NormalFloat of QLoRA).

torchao (0.18: `torchao.quantization.NF4Tensor`, `to_nf4`) stores a weight as
- 4-bit indices into the 16 NF4 levels (two per byte), one per element, after dividing each block
  of `block_size` consecutive elements by its absmax `s`;
- the block absmaxes double-quantised (`NF4Tensor.double_quantize_scalers`): their mean is
  subtracted, then each group of `scaler_block_size` of them is stored as int8 with one scale per
  group (`quantization_factor` = 128 / max |s - mean| of the group). That is QLoRA's double
  quantisation, with int8 where the paper used 8-bit floats.
Dequantised, an element is `level * s_hat`, where `s_hat` is the int8 round trip of `s`. Its
error is at most `s * h + M / 128` (see `nf4_error_bound`): `h` = 0.1519, half the widest gap
between NF4 levels (-1 to -0.6962), for rounding to the nearest level; `M / 128` for the int8
scale (half a step `M / 256` when rounding, a whole step when +M rounds to 128 and is clamped to
127), with `M` = max |s - mean| of the scale's group and |level| <= 1.

`F.linear(x, nf4_weight)` dequantises the weight to `x`'s dtype (torchao's `linear_nf4`), so the
matmul runs in the input's dtype on any device, CPU included. torchao is imported on first use
(it takes seconds), so a model without NF4 weights never pays for it.

Caveats of torchao 0.18's NF4Tensor: `module.to(dtype)` re-quantises the rounded weights (values
move; cast the model to its compute dtype before quantising); `clone` / `copy.deepcopy`
re-quantise with the default block sizes, so a weight of fewer than 256 blocks cannot be
deep-copied; safetensors cannot store it (save `adapter_state_dict` and rebuild the base).
"""

from __future__ import annotations

import math
import sys

import torch

BLOCK_SIZE = 64  # elements per absmax block (QLoRA's and torchao's default)
SCALER_BLOCK_SIZE = 256  # absmaxes per int8 group (torchao's default)
HALF_WIDEST_GAP = (1.0 - 0.6962) / 2  # NF4 levels -1 and -0.6962 are the farthest apart


def quantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] as an NF4Tensor of the same shape and dtype.

    A weight with fewer than 256 blocks (tiny test models) groups its scales by the largest power
    of two dividing its block count instead; real Llama shapes use 256. Raises ValueError when the
    element count is not a multiple of 64."""
    from torchao.quantization import to_nf4

    if weight.numel() % BLOCK_SIZE:
        raise ValueError(f"NF4 needs a multiple of {BLOCK_SIZE} elements, got shape {tuple(weight.shape)}")
    return to_nf4(weight.detach().contiguous(), block_size=BLOCK_SIZE,
                  scaler_block_size=scaler_block_size(weight.numel()))


def scaler_block_size(numel: int) -> int:
    return math.gcd(SCALER_BLOCK_SIZE, numel // BLOCK_SIZE)


def is_nf4(tensor: torch.Tensor) -> bool:
    # An NF4Tensor can only exist once torchao is imported.
    module = sys.modules.get("torchao.quantization")
    return module is not None and isinstance(tensor, module.NF4Tensor)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A dense tensor: torchao's own dequantisation of an NF4 weight, any other weight as is."""
    return weight.get_original_weight() if is_nf4(weight) else weight


def nf4_error_bound(weight: torch.Tensor) -> torch.Tensor:
    """Per element of `weight` [out, in], the most by which its NF4 round trip may differ from it
    (module docstring), float arithmetic aside."""
    flat = weight.detach().flatten()
    scales = flat.view(-1, BLOCK_SIZE).abs().amax(1)  # [n_blocks]
    centred = (scales - scales.mean()).view(-1, scaler_block_size(flat.numel()))
    group_max = centred.abs().amax(1, keepdim=True).expand_as(centred).flatten()  # M of each block's group
    bound = scales * HALF_WIDEST_GAP + group_max / 128
    return bound.repeat_interleave(BLOCK_SIZE).view_as(weight)
