"""LoRALinear: a frozen nn.Linear plus a trained low-rank update (LoRA), optionally DoRA, optionally
with its frozen weight in NF4 (QLoRA).

    y = base(x) + B A dropout(x) * alpha / rank                          A [rank, in], B [out, rank]
    DoRA: y = m / ||W + s B A||_row * (W x + s B A dropout(x)) + bias    m [out], s = alpha / rank

A starts Kaiming-uniform (as nn.Linear initialises its weights) and B at zero, so a fresh adapter
computes exactly its base; DoRA's magnitude starts at the row norms of W, so it does too. As in the
DoRA paper (section 4.3) and PEFT, the row norm is a constant for the gradient (detached).

`weight` is the effective weight (differentiable, dense), so code that reads `linear.weight` itself,
as the fused loss does with `text.output.weight`, sees the adapted layer. With `enabled` False the
module computes its base alone (PEFT's `disable_adapter`: DPO's reference without a second copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.adapters.nf4 import dequantize, is_nf4, quantize_nf4


class LoRALinear(nn.Module):
    """Wraps `base` (kept as the submodule `base`, frozen); trains `lora_A`, `lora_B` (and
    `magnitude` with `use_dora`). `quantize_base="nf4"` replaces the base weight by its NF4 form."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
                 use_dora: bool = False, quantize_base: str | None = None) -> None:
        super().__init__()
        if quantize_base not in (None, "nf4"):
            raise ValueError(f"quantize_base must be None or 'nf4', got {quantize_base!r}")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling = rank, alpha / rank
        base.requires_grad_(False)
        if quantize_base == "nf4":
            base.weight = nn.Parameter(quantize_nf4(base.weight), requires_grad=False)
        self.base = base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True  # False: the base alone (`vlm.adapters.adapters_disabled`)
        self.magnitude = None
        if use_dora:
            with torch.no_grad():
                self.magnitude = nn.Parameter(torch.linalg.vector_norm(self.base_weight(), dim=1))  # [out]
        self.train(base.training)  # a model in eval mode stays there (no adapter dropout)

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def base_weight(self) -> torch.Tensor:
        """The frozen weight [out, in], dense (dequantised when stored in NF4)."""
        return dequantize(self.base.weight)

    def delta(self) -> torch.Tensor:
        """s B A [out, in], in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight [out, in]: W + s B A, rescaled per row with DoRA (W alone while
        the adapter is disabled)."""
        if not self.enabled:
            return self.base_weight()
        combined = self.base_weight().to(self.lora_A.dtype) + self.delta()
        if self.magnitude is None:
            return combined
        return combined * self._dora_scale(combined)[:, None]

    def _dora_scale(self, combined: torch.Tensor) -> torch.Tensor:
        """m / ||W + s B A|| per output row [out]; the norm is a constant for the gradient."""
        return self.magnitude / torch.linalg.vector_norm(combined, dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]
        if not self.enabled:
            return self._base_forward(x)
        dtype = self.lora_A.dtype
        update = F.linear(F.linear(self.dropout(x).to(dtype), self.lora_A), self.lora_B) * self.scaling
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.magnitude is None:
            return self._base_forward(x) + update.to(x.dtype)
        # DoRA scales the weight's product only, so the bias is added after the rescaling.
        scale = self._dora_scale(self.base_weight().to(dtype) + self.delta())
        out = (F.linear(x, self.base.weight) + update.to(x.dtype)) * scale.to(x.dtype)
        return out if bias is None else out + bias

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchao's F.linear on an NF4 weight dequantises it to x's dtype, but adds the bias as is.
        if self.bias is not None and is_nf4(self.base.weight):
            return F.linear(x, self.base.weight) + self.bias.to(x.dtype)
        return self.base(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear (frozen) computing what this module computes in eval mode: weight
        W + s B A (DoRA-rescaled), dequantised from NF4, in the base's dtype; the base's bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.to(self.base.weight.dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        kind = "nf4" if is_nf4(self.base.weight) else str(self.base.weight.dtype)
        return f"rank={self.rank}, scaling={self.scaling:g}, dora={self.use_dora}, base={kind}"
