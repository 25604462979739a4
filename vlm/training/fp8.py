"""fp8 training: convert eligible nn.Linear layers, and a Lightning precision plugin that does it.

Recipes (the `recipe` key of `configs/precision/fp8.yaml`):
- `tensorwise`: torchao, dynamic per-tensor scales computed just in time (e4m3 forward, e5m2 grads).
- `rowwise`: torchao, dynamic per-row scales rounded to powers of two (e4m3 throughout).
- `delayed`: scales from an amax history, the classic Transformer Engine recipe (`fp8_delayed`).

Which layers: an nn.Linear whose in and out features are multiples of 16 (an fp8 GEMM requirement)
and at least `min_features` (64 by default: below that the casts cost more than the fp8 GEMM saves,
and such layers are a negligible share of the FLOPs), minus the fqn patterns in `exclude`:
the lm_head (`text.output`, whose weight the fused loss reads directly), the LLaVA projector
(`fusion.projector`: the first layer to see image features, and small), and anything named
`*gate` (routers, gates). Gates, Perceiver latents and media positions are Parameters, never touched.
The vision tower is converted like the rest, as torchao converts every eligible Linear; add
`"vision"` to `exclude` to keep a frozen pretrained tower in high precision. Linears owned by
nn.MultiheadAttention (open_clip) are skipped: its forward reads their weights, never calls them.

Everything else runs under bf16 autocast on CUDA with fp32 master weights; on CPU it stays fp32.

Order under FSDP2 (ModelParallelStrategy): Lightning calls `convert_module` only after
`configure_model`, i.e. after `fully_shard`, when torchao would mix Tensor and DTensor. So the
sharding code must convert first, in `configure_model`:

    plugin = self.trainer.precision_plugin
    if isinstance(plugin, Float8Precision):
        plugin.convert_module(self.model)      # or convert_to_float8(self.model, recipe=...)
    ... fully_shard(block) for each block, then fully_shard(self.model) ...

The later `convert_module` call by Lightning is then a no-op. Lightning's FSDP1 `FSDPStrategy`
accepts only its own `FSDPPrecision`, so fp8 needs the fsdp2 strategy, DDP or a single device.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.float8.float8_linear import Float8Linear

from vlm.training.fp8_delayed import DelayedFloat8Linear, float8_state, load_float8_state

log = logging.getLogger(__name__)

Recipe = Literal["tensorwise", "rowwise", "delayed"]
RECIPES: tuple[str, ...] = ("tensorwise", "rowwise", "delayed")
DEFAULT_EXCLUDE: tuple[str, ...] = ("text.output", "fusion.projector", "*gate")
ModuleFilter = Callable[[nn.Module, str], bool]


def float8_filter(*, min_features: int = 64, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> ModuleFilter:
    """A `(module, fqn) -> bool` filter: True for the nn.Linear layers to run in fp8.

    `exclude` holds fnmatch patterns matched against every run of whole dotted segments of the fqn,
    so `text.output` excludes `model.text.output` (the LightningModule's view), `fusion.projector`
    excludes `fusion.projector.0`, and `*gate` excludes `blocks.0.ff_gate` but not `gate_proj`.
    """

    def eligible(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if module.in_features % 16 or module.out_features % 16:
            return False
        if min(module.in_features, module.out_features) < min_features:
            return False
        parts = fqn.split(".")
        runs = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}
        return not any(fnmatch.fnmatchcase(run, pattern) for run in runs for pattern in exclude)

    return eligible


def torchao_config(recipe: str) -> Float8LinearConfig:
    """torchao's recipe, with GEMM inner dims padded to 16 (B*T is rarely a multiple of 16)."""
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=True)


def float8_recipe_of(module: nn.Module) -> str | None:
    """The recipe an fp8 layer was converted with (`custom` for other torchao configs); None if not fp8."""
    if isinstance(module, DelayedFloat8Linear):
        return "delayed"
    if isinstance(module, Float8Linear):
        return next((r for r in ("tensorwise", "rowwise") if module.config == torchao_config(r)), "custom")
    return None


def convert_to_float8(model: nn.Module, *, recipe: Recipe, module_filter: ModuleFilter | None = None,
                      history_len: int = 16, margin: int = 0) -> nn.Module:
    """Swap the eligible nn.Linear layers of `model` for fp8 ones, in place; returns `model`
    (a new module only when `model` itself is an eligible Linear).

    Idempotent: layers already converted with `recipe` are left alone; a model converted with another
    recipe is an error. Call it before `fully_shard` (FSDP2). The new layers hold the very same
    Parameter objects under the same names, so freezing, optimizer groups and checkpoints carry over.

    Args:
        recipe: `tensorwise`, `rowwise` or `delayed`.
        module_filter: `(module, fqn) -> bool`; default `float8_filter()`.
        history_len, margin: delayed scaling only (amax window; scale headroom as a power of two).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown fp8 recipe {recipe!r}; choose one of {list(RECIPES)}")
    done = {fqn: r for fqn, m in model.named_modules() if (r := float8_recipe_of(m)) is not None}
    if clash := {fqn: r for fqn, r in done.items() if r != recipe}:
        fqn, other = next(iter(clash.items()))
        raise ValueError(f"layer {fqn or '<root>'} is already fp8 with recipe {other!r}; cannot convert to {recipe!r}")
    module_filter = module_filter or float8_filter()
    # MultiheadAttention reads out_proj.weight itself, so a swapped out_proj would never run in fp8.
    owned = {f"{fqn}.{child}".lstrip(".") for fqn, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
             for child, _ in m.named_children()}

    def wanted(module: nn.Module, fqn: str) -> bool:
        return fqn not in done and fqn not in owned and module_filter(module, fqn)

    if recipe != "delayed":
        converted = convert_to_float8_training(model, module_filter_fn=wanted, config=torchao_config(recipe))
    else:
        converted = _swap_delayed(model, wanted, history_len=history_len, margin=margin)
    count = sum(float8_recipe_of(m) is not None for m in converted.modules()) - len(done)
    log.info("fp8 (%s): converted %d Linear layers (%d already fp8)", recipe, count, len(done))
    return converted


def _swap_delayed(model: nn.Module, wanted: ModuleFilter, *, history_len: int, margin: int) -> nn.Module:
    if isinstance(model, nn.Linear):
        return DelayedFloat8Linear.from_linear(model, history_len=history_len, margin=margin) if wanted(model, "") else model
    targets = [(fqn, m) for fqn, m in model.named_modules() if fqn and wanted(m, fqn)]
    for fqn, linear in targets:
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, name, DelayedFloat8Linear.from_linear(linear, history_len=history_len, margin=margin))
    return model


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


class Float8Precision(Precision):
    """Lightning precision plugin: fp8 Linear layers (torchao or our delayed scaling), bf16 autocast
    for the rest on CUDA, plain fp32 on CPU. Pass it as `trainer.plugins` with `trainer.precision`
    unset (null): Lightning refuses both.

    Args:
        recipe: `tensorwise`, `rowwise` or `delayed`.
        min_features, exclude: the default layer filter (see `float8_filter`).
        history_len, margin: delayed scaling only.
        autocast_dtype: dtype of the non-fp8 CUDA ops (`bfloat16`), or None for fp32 everywhere.
    """

    def __init__(self, recipe: Recipe = "tensorwise", *, min_features: int = 64, exclude: list[str] | None = None,
                 history_len: int = 16, margin: int = 0, autocast_dtype: Literal["bfloat16"] | None = "bfloat16") -> None:
        if recipe not in RECIPES:
            raise ValueError(f"Float8Precision: unknown recipe {recipe!r}; choose one of {list(RECIPES)}")
        self.recipe, self.history_len, self.margin = recipe, history_len, margin
        self.module_filter = float8_filter(min_features=min_features, exclude=DEFAULT_EXCLUDE if exclude is None else exclude)
        use_cuda = autocast_dtype is not None and torch.cuda.is_available()
        self.autocast_dtype = torch.bfloat16 if use_cuda else None
        self.precision = "bf16-mixed" if use_cuda else "32-true"  # what Lightning's summary and monitors read
        self._module: nn.Module | None = None

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Convert in place (single device, DDP). A model that FSDP2 has sharded must already be
        converted, in configure_model before fully_shard; this call is then a no-op."""
        self._module = module
        converted = any(float8_recipe_of(m) is not None for m in module.modules())
        if _is_sharded(module):
            if not converted:
                raise RuntimeError("Float8Precision: the model is already sharded (FSDP2) but has no fp8 layers; call "
                                   "trainer.precision_plugin.convert_module(model) in configure_model before fully_shard")
            return module
        return convert_to_float8(module, recipe=self.recipe, module_filter=self.module_filter,
                                 history_len=self.history_len, margin=self.margin)

    def forward_context(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)  # CPU ops are unaffected

    def state_dict(self) -> dict[str, Any]:
        """The delayed-scaling histories and scales (empty for the dynamic recipes)."""
        if self.recipe != "delayed" or self._module is None:
            return {}
        return {"recipe": self.recipe, "scaling": {k: v.cpu() for k, v in float8_state(self._module).items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("recipe") != self.recipe:
            log.warning("fp8: checkpoint holds %r scaling state, this run uses %r; starting with fresh scales",
                        state_dict.get("recipe"), self.recipe)
            return
        if self._module is None:
            raise RuntimeError("Float8Precision.load_state_dict called before convert_module")
        load_float8_state(self._module, state_dict["scaling"])
