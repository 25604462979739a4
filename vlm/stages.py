"""Training stages: which parts of a VisionLanguageModel train.

- `align`: only the parameters the fusion adds (projector; resampler and cross-attention).
- `instruct`: fusion + text backbone.
- `full`: everything, vision tower included.
Or explicit `include` / `exclude` glob patterns over parameter names (applied after the stage).

LoRA adapters (`vlm.adapters`) train whatever the stage, unless excluded; the frozen linears they
wrap (`*.base.weight`, `*.base.bias`) never train, whatever the stage or patterns say.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

STAGES: dict[str, tuple[str, ...]] = {
    "align": ("fusion",),
    "instruct": ("fusion", "text"),
    "full": ("fusion", "text", "vision"),
}
PARTS = ("vision", "fusion", "text")


@dataclass
class ParameterTable:
    """Trainable and frozen parameter counts per part; `adapters`: the LoRA tensors among the
    trainable ones (a part without adapters has no entry)."""

    rows: dict[str, tuple[int, int]]  # part -> (trainable, frozen)
    adapters: dict[str, int] = field(default_factory=dict)  # part -> trainable LoRA parameters

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.rows.values())

    @property
    def frozen(self) -> int:
        return sum(f for _, f in self.rows.values())

    def __str__(self) -> str:
        if not self.adapters:
            lines = [f"{'part':<8} {'trainable':>14} {'frozen':>14}"]
            lines += [f"{part:<8} {trainable:>14,} {frozen:>14,}" for part, (trainable, frozen) in self.rows.items()]
            return "\n".join([*lines, f"{'total':<8} {self.trainable:>14,} {self.frozen:>14,}"])
        lines = [f"{'part':<8} {'trainable':>14} {'of which LoRA':>14} {'frozen':>14}"]
        for part, (trainable, frozen) in self.rows.items():
            lines.append(f"{part:<8} {trainable:>14,} {self.adapters.get(part, 0):>14,} {frozen:>14,}")
        lines.append(f"{'total':<8} {self.trainable:>14,} {sum(self.adapters.values()):>14,} {self.frozen:>14,}")
        return "\n".join(lines)


def set_trainable(
    model: nn.Module, stage: str | None = None, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> ParameterTable:
    """Set `requires_grad` on every parameter of `model` and return the resulting table.

    `stage` picks whole parts (see STAGES); `include` then turns on parameters whose name matches
    any glob, and `exclude` turns off those matching any glob (exclude wins).
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)} or use include/exclude")
    if stage is None and not include:
        raise ValueError("give a stage or at least one include pattern")
    parts = STAGES.get(stage, ())
    names = [name for name, _ in model.named_parameters()]
    for pattern in (*include, *exclude):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"pattern {pattern!r} matches no parameter (names look like {names[0]!r})")
    adapters, bases = _adapter_parameters(model)
    vision = getattr(model, "vision", None)
    if vision is not None and hasattr(vision, "set_frozen"):
        # The tower knows which of its parameters its library keeps fixed (e.g. sin-cos tables).
        vision.set_frozen("vision" not in parts)
    for name, param in model.named_parameters():
        part = name.split(".")[0]
        on = (param.requires_grad if part == "vision" else part in parts) or any(fnmatch.fnmatchcase(name, p) for p in include)
        on = (on or name in adapters) and name not in bases
        param.requires_grad_(on and not any(fnmatch.fnmatchcase(name, p) for p in exclude))
    if vision is not None and hasattr(vision, "frozen"):
        # A tower with nothing to train stays in eval mode (fixed norms, no dropout).
        vision.frozen = not any(p.requires_grad for p in vision.parameters())
        vision.train(model.training)
    return parameter_table(model)


def parameter_table(model: nn.Module) -> ParameterTable:
    rows: dict[str, list[int]] = {}
    adapters: dict[str, int] = {}
    adapter_names = _adapter_parameters(model)[0]
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        part = name.split(".")[0]
        row = rows.setdefault(part, [0, 0])
        row[0 if param.requires_grad else 1] += param.numel()
        if name in adapter_names and param.requires_grad:
            adapters[part] = adapters.get(part, 0) + param.numel()
    return ParameterTable({part: (t, f) for part, (t, f) in rows.items()}, adapters)


def _adapter_parameters(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the LoRA adapter parameters of `model` and of the frozen linears they wrap."""
    from vlm.adapters import LoRALinear  # vlm.adapters reads PARTS from here: imported on use

    adapters, bases = set(), set()
    for prefix, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for name, _ in module.named_parameters(prefix=prefix):
                (bases if name.startswith(f"{prefix}.base.") else adapters).add(name)
    return adapters, bases
