"""Optimizer parameter groups (per-part learning rates, no decay on norms/biases/gates) and the
warmup + cosine schedule. Plain PyTorch; the LightningModule only calls these."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

PARTS = ("vision", "fusion", "text")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    lr_scale: dict[str, float] = field(default_factory=dict)  # per part, e.g. {"vision": 0.1}

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("OptimConfig: lr must be > 0, weight_decay and warmup_steps >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        unknown = sorted(set(self.lr_scale) - set(PARTS))
        if unknown:
            raise ValueError(f"OptimConfig.lr_scale: unknown parts {unknown}; parts are {list(PARTS)}")
        self.betas = tuple(self.betas)


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases, gates, embeddings of positions/latents: 1-D or named so."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf.endswith("_gate") or leaf in {"latents", "media_pos", "token_pos", "pos_embed", "cls_token"}


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """One group per (part, decay) pair holding at least one trainable parameter."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        part = name.split(".")[0]
        groups.setdefault((part, no_decay(name, param)), []).append(param)
    return [
        {"params": params, "name": f"{part}{'/no_decay' if skip else ''}",
         "lr": config.lr * config.lr_scale.get(part, 1.0), "weight_decay": 0.0 if skip else config.weight_decay}
        for (part, skip), params in sorted(groups.items())
    ]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup from ~0 to 1, then cosine down to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: int):
    groups = param_groups(model, config)
    if not groups:
        raise ValueError("no trainable parameters: check the training stage / include patterns")
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=config.warmup_steps, total_steps=total_steps, min_ratio=config.min_lr_ratio)
    )
    return optimizer, scheduler
