"""Put LoRA adapters on a model's linears by name, list and save them, and merge them away.

Works on any nn.Module: `apply_lora` only needs the top-level parts named in the config to be
submodules (`text`, `vision`, `fusion` of a VisionLanguageModel), and knows nothing of fusions.
Adapted modules keep their names: `text.layers.0.attention.wq` becomes a LoRALinear whose frozen
linear is `text.layers.0.attention.wq.base` and whose adapter tensors are `...wq.lora_A`,
`...wq.lora_B` (and `...wq.magnitude` with DoRA).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from vlm.adapters.config import LoRAConfig
from vlm.adapters.lora import LoRALinear
from vlm.adapters.nf4 import BLOCK_SIZE


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every nn.Linear of `config.parts` whose name matches a glob of `config.targets` by a
    LoRALinear around it (base weights frozen, in NF4 with `quantize_base`). Returns the adapted
    names. ValueError when a part is missing, a glob matches no linear, or a match already has an
    adapter or shares its weight with another module (tied embeddings)."""
    linears: dict[str, nn.Module] = {}
    for part in config.parts:
        module = getattr(model, part, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"LoRAConfig.parts: the model has no submodule {part!r}")
        linears.update(_linears(module, prefix=part))
    for pattern in config.targets:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
            example = next(iter(linears), "(none)")
            raise ValueError(f"LoRAConfig.targets: {pattern!r} matches no nn.Linear in parts {config.parts} "
                             f"(names look like {example!r})")
    names = [name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in config.targets)]
    wrap_linears(model, names, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                 use_dora=config.use_dora, quantize_base=config.quantize_base)
    return names


def _linears(module: nn.Module, *, prefix: str) -> dict[str, nn.Module]:
    """Linears and LoRALinears by full name, without the linears inside a LoRALinear."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, child in module.named_modules(prefix=prefix):
        if any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if isinstance(child, LoRALinear):
            inside.append(name)
        if isinstance(child, (nn.Linear, LoRALinear)):
            found[name] = child
    return found


def wrap_linears(model: nn.Module, names: Iterable[str], *, rank: int, alpha: float, dropout: float = 0.0,
                 use_dora: bool = False, quantize_base: str | None = None) -> None:
    """Wrap the nn.Linear modules at `names` (full names in `model`) in LoRALinear."""
    names = list(names)
    owners: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name.rsplit(".", 1)[0])
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter: merge_lora first, or leave it out of the targets")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        shared = [owner for owner in owners[id(module.weight)] if owner != name]
        if shared:
            raise ValueError(f"{name}: its weight is shared with {shared[0]} (tied); an adapter would untie them")
        if quantize_base == "nf4" and module.weight.numel() % BLOCK_SIZE:
            raise ValueError(f"LoRAConfig.quantize_base: {name} has {module.weight.numel()} weights, "
                             f"not a multiple of the NF4 block ({BLOCK_SIZE})")
    for name in names:  # all checked first, so a refusal leaves the model unchanged
        adapted = LoRALinear(model.get_submodule(name), rank=rank, alpha=alpha, dropout=dropout,
                             use_dora=use_dora, quantize_base=quantize_base)
        model.set_submodule(name, adapted)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRALinear of `model` computes its base alone, as if un-adapted
    (PEFT's `disable_adapter`); on exit each is as it was. Tensors are not touched, so a graph
    built before or after is unaffected. Yields `model`."""
    modules = list(lora_modules(model).values())
    states = [module.enabled for module in modules]
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module, state in zip(modules, states):
            module.enabled = state


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A, B, DoRA magnitudes): what a LoRA optimizer trains."""
    return [p for m in lora_modules(model).values() for n, p in m.named_parameters() if not n.startswith("base.")]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by full name (`text.layers.0.attention.wq.lora_A`), detached."""
    return {f"{name}.{n}": p.detach() for name, m in lora_modules(model).items()
            for n, p in m.named_parameters() if not n.startswith("base.")}


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "state") -> None:
    """Copy adapter tensors into an adapted model; every missing, unexpected or mis-shaped one is named."""
    expected = adapter_state_dict(model)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(v.shape)} != adapter shape {tuple(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        raise ValueError(f"{source} does not match the model's adapters: {'; '.join(problems)}")
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding its merged weight (dequantised from
    NF4), in place; returns `model`, whose state-dict keys are then those of the un-adapted model."""
    for name, module in lora_modules(model).items():
        model.set_submodule(name, module.merged())
    return model
