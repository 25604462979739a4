"""`vlm memory --config A.yaml [--config B.yaml ...] [--devices N] [--batch-size B] [--seq-len T] [--trainer.X V]`:
the memory one device needs to train a recipe, known before launching it.

The YAMLs and `--trainer.*` / `--model.*` / `--data.*` overrides are composed as `vlm fit` composes
them, and what training refuses (fp8 with FSDP1, fp8 with tensor parallelism) is refused here too,
in the same words. The model is built on the meta device (no memory, no weights read) with the
recipe's stage freezing, so parameter counts and the trained parts are exact. The rest is derived
from shapes, for one steady-state training step:

- weights, gradients and AdamW's two moments, in the parameters' dtype. Lightning's mixed precision
  keeps fp32 parameters: they are the master weights, there is no third copy. FSDP (`fsdp`, an
  FSDPStrategy; its sharding_strategy) and FSDP2 (ModelParallelStrategy) divide them by the shard
  count; DDP and a single device do not, and DDP adds its gradient buckets.
- weight copies: the low-precision casts autocast keeps for the backward of every linear autograd
  runs through; under FSDP, the unsharded root plus two blocks (running and prefetched).
- activations: the tensors autograd saves, layer by layer, with SDPA's flash path (no T x T matrix;
  a padded batch's mask is not counted). A frozen linear keeps no input; a frozen vision tower runs
  without autograd. With activation checkpointing (`activation_checkpointing` on the model or the
  strategy; both columns are printed) each block keeps its inputs, plus one block recomputed.
- the loss (`vlm.text.loss`, fused and chunked): d loss/d hidden and, if the output matrix trains,
  its fp32 gradient; one chunk's logits at a time.
- the peak transient: Lightning zeroes the previous gradients after the forward, so the peak is
  either the end of the forward (old gradients + the loss chunk) or a block's backward (its
  gradient temporaries; with checkpointing, while the new gradients build up).

MoE feed-forwards (`model.config.text.moe`): every expert's weights, gradients and moments count
(total parameters); a token runs through top_k experts (expert choice: capacity_factor or top_k on
average), so its activations are those of a dense SwiGLU of that many experts' width (the active
parameters), plus the dispatch: the router's fp32 logits and scores, and per assignment the row
gathered for its expert, that expert's output and the weighted output. With a capacity (token choice) the experts run over the
padded buffer, capacity_factor x as many rows as assignments: its activations count that much. The note line gives total and active parameter counts.

LoRA / QLoRA (`model.lora`): the adapters are put on the meta model, so the trainable set, the
gradients and the AdamW moments are the adapters' plus what the stage trains fully; an adapted
linear keeps its input for the adapter's gradient. With `quantize_base: nf4` the adapted weights
take `NF4_BYTES` each (sharded alike), keep no autocast cast and are gathered in NF4.

fp8 (`vlm.training.fp8.Float8Precision`): the plugin's own filter picks the fp8 linears. Our
`delayed` recipe keeps their inputs and weights as 1-byte casts; torchao's `tensorwise` and
`rowwise` keep the high-precision (autocast) input, so those count as bf16. fp8 layers of a trained
vision tower are counted as bf16 (approximation).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn

from vlm.adapters import lora_modules
from vlm.adapters.nf4 import BLOCK_SIZE, SCALER_BLOCK_SIZE
from vlm.errors import UserError
from vlm.model import VisionLanguageModel, VLMConfig, build_model
from vlm.stages import ParameterTable, set_trainable
from vlm.text.llama import FeedForward
from vlm.text.moe import Experts, MoEFeedForward, moe_layers
from vlm.training.activations import Activations, Shapes, activation_rows
from vlm.training.cli import VLMCLI
from vlm.training.lora import LoRARun, lora_settings
from vlm.training.parallel import blocks

# trainer.precision: (parameter bytes, matmul/attention bytes, residual-stream bytes, autocast)
PRECISIONS = {"32-true": (4, 4, 4, False), "bf16-mixed": (4, 2, 4, True), "16-mixed": (4, 2, 4, True),
              "bf16-true": (2, 2, 2, False), "16-true": (2, 2, 2, False)}
ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
# An NF4 weight: 4-bit codes, an int8 absmax per block, an fp32 factor per group of block scales.
NF4_BYTES = 0.5 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * SCALER_BLOCK_SIZE)


@dataclass(frozen=True)
class Precision:
    name: str
    param: int  # bytes of a parameter, its gradient and each AdamW moment
    compute: int  # bytes of the matmul and attention tensors saved for backward
    residual: int  # bytes of the residual stream and the norm outputs
    autocast: bool  # ops cast their inputs: each linear keeps its own cast, and a weight cast
    fp8_recipe: str | None = None
    fp8_filter: Any = None  # (module, fqn) -> bool: the linears the fp8 plugin converts

    def fp8(self, module: nn.Module, fqn: str) -> bool:
        return self.fp8_filter is not None and self.fp8_filter(module, fqn)

    def dtype(self, size: int) -> str:
        return {4: "fp32", 2: "fp16" if self.name.startswith("16") else "bf16", 1: "fp8"}[size]

    def casts(self, strategy: Strategy) -> bool:
        """Autocast keeps weight casts, unless FSDP already gathers the weights in the compute dtype."""
        return self.autocast and not (strategy.gathers and strategy.gather_bytes == self.compute)


@dataclass(frozen=True)
class Strategy:
    name: str
    devices: int
    weight_shards: int  # weights are divided by this
    state_shards: int  # gradients and optimizer state are divided by this
    gather_bytes: int | None  # FSDP: bytes per element of the unsharded working parameters
    ddp: bool
    checkpointing: bool
    tensor_parallel: int = 1  # decoder linears split Megatron-style (FSDP2 only)
    offload: bool = False  # FSDP cpu_offload: sharded weights, gradients, optimizer live in host memory
    kind: str = "single"  # single, ddp, fsdp (FSDP1) or fsdp2

    def tensor_split(self, name: str) -> int:
        """How many ways tensor parallelism splits parameter `name` (decoder linears only)."""
        split = name.startswith("text.layers.") and (".attention.w" in name or ".feed_forward.w" in name)
        return self.tensor_parallel if split else 1

    @property
    def gathers(self) -> bool:
        """FSDP gathers each unit's sharded weights before using them."""
        return self.gather_bytes is not None and self.weight_shards > 1


def resolve_precision(trainer: Mapping[str, Any]) -> Precision:
    """From `trainer.plugins` (the fp8 plugin, or one with a `precision` argument) or `trainer.precision`."""
    plugins = trainer.get("plugins") or []
    for plugin in [plugins] if isinstance(plugins, Mapping) else plugins:  # one plugin, or a list
        cls, args = _class_and_args(plugin)
        if cls is not None and cls.__name__ == "Float8Precision":
            args = {**{k: p.default for k, p in inspect.signature(cls).parameters.items()}, **args}
            compute = 2 if args.get("autocast_dtype") else 4  # bf16 autocast on CUDA, the machine we estimate for
            return Precision(f"fp8 {args['recipe']}", 4, compute, 4, compute == 2, args["recipe"], cls(**args).module_filter)
        if "precision" in args:
            trainer = {**trainer, "precision": args["precision"]}
    name = str(trainer.get("precision") or "32-true")
    name = ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"trainer.precision {name!r} is not supported; use one of {sorted(PRECISIONS)} or the fp8 plugin")
    return Precision(name, *PRECISIONS[name])


def resolve_strategy(trainer: Mapping[str, Any], model: Mapping[str, Any], precision: Precision, devices: int | None) -> Strategy:
    """Sharding and activation checkpointing of `trainer.strategy` (a name or a class_path entry)."""
    spec = trainer.get("strategy") or "auto"
    cls, args = _class_and_args(spec)
    per_node = devices or _device_count(trainer.get("devices"))
    world = devices or per_node * int(trainer.get("num_nodes") or 1)
    kind = _strategy_kind(spec, cls, world)
    weight = state = tp = 1
    gather = None
    if kind == "fsdp":
        mode = str(getattr(args.get("sharding_strategy"), "name", args.get("sharding_strategy") or "FULL_SHARD"))
        group = min(per_node, world) if "HYBRID" in mode else world
        weight = 1 if mode in ("NO_SHARD", "SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2") else group
        state = 1 if mode == "NO_SHARD" else group
        gather = 2 if precision.name.startswith(("bf16", "16")) else precision.param  # Lightning's FSDPPrecision
    elif kind == "fsdp2":  # Lightning's "auto": tensor parallel over a node's devices, data parallel across nodes
        tp = args.get("tensor_parallel_size", "auto")
        tp = min(per_node, world) if tp == "auto" else int(tp)
        size = args.get("data_parallel_size", "auto")
        weight = state = max(world // tp, 1) if size == "auto" else int(size)
        gather = 2 if precision.name.startswith("bf16") else precision.param  # VLMModule's MixedPrecisionPolicy
    flags = [model.get("activation_checkpointing")] + [args.get(k) for k in ("activation_checkpointing", "activation_checkpointing_policy")]
    name = spec if cls is None else cls.__name__
    return Strategy(f"{name} ({kind})", world, weight, state, gather, kind == "ddp" and world > 1, any(bool(f) for f in flags),
                    tp, bool(args.get("cpu_offload")), kind)


def check_trainable(precision: Precision, strategy: Strategy) -> None:
    """Refuse, with training's own words, the combinations `vlm fit` refuses."""
    if precision.fp8_recipe and strategy.kind == "fsdp":
        raise UserError("fp8 (configs/precision/fp8.yaml) does not combine with FSDP1 (configs/strategy/fsdp.yaml; "
                        "Lightning accepts only its own precision there): use configs/strategy/fsdp2.yaml")
    if precision.fp8_recipe and strategy.tensor_parallel > 1:
        raise UserError("fp8 (configs/precision/fp8.yaml) does not combine with tensor parallelism "
                        "(tensor_parallel_size > 1): drop one of them")


def _strategy_kind(spec: Any, cls: type | None, world: int) -> str:
    if cls is None:
        name = str(spec)
        named = {"auto": "ddp" if world > 1 else "single", "single_device": "single", "model_parallel": "fsdp2"}
        kind = named.get(name) or next((k for k in ("ddp", "fsdp") if name.startswith(k)), None)
    else:
        bases = ((ModelParallelStrategy, "fsdp2"), (FSDPStrategy, "fsdp"), (DDPStrategy, "ddp"), (SingleDeviceStrategy, "single"))
        kind = next((k for base, k in bases if issubclass(cls, base)), None)
    if kind is None:
        raise ValueError(f"trainer.strategy {spec!r} is not supported here: use auto, ddp, fsdp or ModelParallelStrategy (FSDP2)")
    return kind


def _class_and_args(spec: Any) -> tuple[type | None, dict[str, Any]]:
    if not isinstance(spec, Mapping):
        return None, {}
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name), dict(spec.get("init_args") or {})


def _device_count(devices: Any) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return int(devices) if str(devices).isdigit() and int(devices) > 0 else 1  # "auto", -1: see --devices


def _split(items: Iterable[tuple[nn.Parameter, float]]) -> tuple[int, int]:
    """(trainable, frozen) bytes of (parameter, bytes per element) pairs, each parameter once."""
    seen, out = set(), [0.0, 0.0]
    for param, size in items:
        if id(param) not in seen:
            seen.add(id(param))
            out[0 if param.requires_grad else 1] += param.numel() * size
    return math.ceil(out[0]), math.ceil(out[1])


def static_memory(model: VisionLanguageModel, p: Precision, strategy: Strategy, grad_parts: set[str],
                  nf4: frozenset[int] = frozenset()) -> dict[str, tuple[int, int]]:
    """Per device (trainable, frozen) bytes of the weights, their working copies, gradients, AdamW
    moments; `nf4`: ids of the parameters stored in NF4 (QLoRA's adapted weights)."""

    def per_device(shards: int) -> tuple[int, int]:
        return _split((q, (NF4_BYTES if id(q) in nf4 else p.param) / (shards * strategy.tensor_split(name)))
                      for name, q in model.named_parameters())

    weights, trainable = per_device(strategy.weight_shards), per_device(strategy.state_shards)[0]
    if strategy.offload:
        weights, trainable = (0, 0), 0  # in host memory
    buckets = trainable if strategy.ddp else 0  # DDP's gradient buckets (not views of the gradients)
    return {"weights": weights, "weight copies": weight_copies(model, p, strategy, grad_parts, nf4),
            "gradients": (trainable + buckets, 0), "optimizer": (2 * trainable, 0)}


def weight_copies(model: VisionLanguageModel, p: Precision, strategy: Strategy, grad_parts: set[str],
                  nf4: frozenset[int] = frozenset()) -> tuple[int, int]:
    items: list[tuple[nn.Parameter, float]] = []
    if strategy.gathers:  # the unsharded root, and the running and the prefetched block
        units = blocks(model)
        inside = {id(q) for b in units for q in b.parameters()}
        largest = sorted(units, key=lambda b: sum(q.numel() for q in b.parameters()))[-2:]
        gathered = [q for q in model.parameters() if id(q) not in inside] + [q for b in largest for q in b.parameters()]
        items += [(q, NF4_BYTES if id(q) in nf4 else strategy.gather_bytes) for q in gathered]
    casts = p.casts(strategy)
    for fqn, module in model.named_modules():
        if isinstance(module, Experts):  # stacked expert weights: autocast casts each for its grouped matmuls
            items += [(w, p.compute) for w in (module.w1, module.w2, module.w3)] if casts and "text" in grad_parts else []
            continue
        weight = module.weight if isinstance(module, nn.Linear) else getattr(module, "in_proj_weight", None)
        if weight is None or fqn == "text.output" or fqn.split(".")[0] not in grad_parts or id(weight) in nf4:
            continue  # text.output: the loss's cast is a transient; a part without autograd keeps no casts;
            # an NF4 weight is dequantised again in backward
        if p.fp8(module, fqn):
            items += [(weight, 1)] if p.fp8_recipe == "delayed" else []
        elif casts:
            items.append((weight, p.compute))
    return _split(items)


@dataclass
class MemoryEstimate:
    """Per-device memory of a recipe's training step; `str()` is the table `vlm memory` prints."""

    recipe: list[str]
    precision: Precision
    strategy: Strategy
    shapes: Shapes
    parameters: ParameterTable
    static: dict[str, tuple[int, int]]  # weights, weight copies, gradients, optimizer -> (trainable, frozen)
    activations: dict[str, tuple[int, int]]  # part -> (no checkpointing, checkpointing)
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool | None = None) -> int:
        """Peak bytes per device; `checkpointing` None: as the recipe is configured."""
        on = self.strategy.checkpointing if checkpointing is None else checkpointing
        return sum(map(sum, self.static.values())) + sum(a[on] for a in self.activations.values())

    def __str__(self) -> str:
        p, s, st, adapters = self.precision, self.shapes, self.strategy, self.parameters.adapters
        param = p.dtype(p.param)
        copies = "+".join(["unsharded"] * st.gathers + [f"{p.dtype(p.compute)} casts"] * p.casts(st)) or "none"
        labels = {"weights": f"weights ({param})", "weight copies": f"weight copies ({copies})",
                  "gradients": f"gradients ({param})", "optimizer": f"AdamW moments (2 x {param})"}
        tensor = f", tensor parallel x{st.tensor_parallel}" if st.tensor_parallel > 1 else ""
        lines = [f"vlm memory: {' + '.join(self.recipe)}",
                 f"strategy {st.name} on {st.devices} device(s): weights / {st.weight_shards}, gradients and optimizer / "
                 f"{st.state_shards}{tensor}; precision {p.name}; per device {s.batch_size} x {s.seq_len} tokens, "
                 f"{s.images_per_sample} image(s) per sample", "",
                 f"{'parameters':<34}{'trainable':>16}" + (f"{'of which LoRA':>16}" if adapters else "") + f"{'frozen':>16}"]
        lines += [f"  {part:<32}{t:>16,}" + (f"{adapters.get(part, 0):>16,}" if adapters else "") + f"{f:>16,}"
                  for part, (t, f) in self.parameters.rows.items()]
        lines += ["", f"{'per device':<34}{'trainable':>16}{'frozen':>16}{'total':>16}"]
        lines += [f"  {labels[k]:<32}{_size(t):>16}{_size(f):>16}{_size(t + f):>16}" for k, (t, f) in self.static.items()]
        lines += [f"{'activations':<34}{'no checkpointing':>16}{'checkpointing':>16}"]
        lines += [f"  {part:<32}{_size(a):>16}{_size(c):>16}" for part, (a, c) in self.activations.items()]
        totals = [_size(self.total(on)) + ("*" if on == st.checkpointing else "") for on in (False, True)]
        lines += [f"{'total':<34}{totals[0]:>16}{totals[1]:>16}", "* the recipe's setting"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _size(n: int) -> str:
    return "-" if n == 0 else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class RecipeParser(VLMCLI):
    """VLMCLI that composes the YAMLs (defaults, overrides, validation) and instantiates nothing."""

    def init_parser(self, **kwargs: Any):
        return super().init_parser(**kwargs, exit_on_error=False)  # errors raise, they do not exit

    def instantiate_classes(self) -> None:
        pass


def compose(config_files: Sequence[str], cli_args: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe as `vlm fit --config A --config B ... [cli_args]` sees it, as plain dicts (seeds nothing)."""
    args = [arg for path in config_files for arg in ("--config", str(path))] + list(cli_args)
    with warnings.catch_warnings():  # `vlm memory`'s own argv is not meant for LightningCLI
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        parser = RecipeParser(args=[*args, "--seed_everything=false"], run=False)
    return parser.config.as_dict()


def meta_model(model: Mapping[str, Any]) -> tuple[VisionLanguageModel, ParameterTable, frozenset[int]]:
    """The recipe's model on the meta device, with its LoRA adapters and its stage's trainable set;
    and the ids of the parameters QLoRA stores in NF4."""
    config = dict(model["config"])
    config["vision"] = {**config["vision"], "checkpoint_path": None}  # structure only: no weights are read
    with torch.device("meta"):
        vlm = build_model(VLMConfig.from_dict(config))
        lora = lora_settings(model.get("lora"))
        if lora is not None:
            LoRARun(lora, text_checkpoint=None, init_checkpoint=None).apply(vlm)  # bases dense: counted as NF4 below
    table = set_trainable(vlm, model.get("stage"), include=model.get("include") or (), exclude=model.get("exclude") or ())
    quantized = lora is not None and lora.quantize_base == "nf4"
    nf4 = frozenset(id(m.base.weight) for m in lora_modules(vlm).values()) if quantized else frozenset()
    return vlm, table, nf4


def estimate_memory(config_files: list[str], *, devices: int | None = None, batch_size: int | None = None,
                    seq_len: int | None = None, images_per_sample: int = 1, cli_args: Sequence[str] = ()) -> MemoryEstimate:
    """Per-device memory of training the recipe composed from `config_files` (later files override)
    and `cli_args` (`--trainer.devices`, `8`, ... as for `vlm fit`). Raises UserError for a recipe
    training refuses.

    devices: processes in total (default trainer.devices x trainer.num_nodes; "auto" counts 1).
    batch_size: per device (default data.batch_size). seq_len: padded text length, image tokens
    included (default data.max_length, else the model's max_seq_len).
    """
    overrides = {"devices": devices, "batch_size": batch_size, "seq_len": seq_len, "images_per_sample": images_per_sample}
    for name, value in overrides.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    recipe = compose(config_files, cli_args)
    trainer, model_section, data = recipe["trainer"], recipe["model"], recipe.get("data") or {}
    precision = resolve_precision(trainer)
    strategy = resolve_strategy(trainer, model_section, precision, devices)
    check_trainable(precision, strategy)  # before the model is built: refused recipes fail fast
    model, table, nf4 = meta_model(model_section)
    seq_len = seq_len or data.get("max_length") or model.text.config.max_seq_len
    shapes = Shapes(batch_size or data.get("batch_size") or 1, seq_len, images_per_sample)
    if seq_len < images_per_sample * model.tokens_per_image:
        raise ValueError(f"seq_len {seq_len} cannot hold {images_per_sample} image(s) x {model.tokens_per_image} tokens")
    activations = MoEActivations(model, precision, shapes, tensor_parallel=strategy.tensor_parallel)
    grad_parts = {part for part, on in (("vision", activations.vision_grad), ("fusion", activations.upstream),
                                        ("text", activations.text_grad)) if on}
    static = static_memory(model, precision, strategy, grad_parts, nf4)
    freed = static["gradients"][0] // (2 if strategy.ddp else 1)  # zero_grad frees the gradients, not DDP's buckets
    notes = _notes(trainer, precision, strategy, devices) + _lora_notes(model, nf4) + _moe_notes(model)
    if model.config.fusion.name not in Activations.FUSIONS:
        notes.append(f"fusion {model.config.fusion.name!r}: its activations are not modeled (counted as 0)")
    return MemoryEstimate([str(f) for f in config_files], precision, strategy, shapes, table, static,
                          activation_rows(activations, freed), notes)


def _notes(trainer: Mapping[str, Any], precision: Precision, strategy: Strategy, devices: int | None) -> list[str]:
    notes = []
    if devices is None and str(trainer.get("devices")) in ("auto", "-1"):
        notes.append(f"trainer.devices is {trainer.get('devices')!r}: counted as 1 per node; pass --devices N")
    if strategy.offload:
        notes.append("cpu_offload: the sharded weights, gradients and optimizer state are in host memory")
    if strategy.tensor_parallel > 1:
        notes.append(f"tensor parallel x{strategy.tensor_parallel}: decoder heads and hidden features split; "
                     "norms, residuals and linear inputs replicated (no sequence parallelism)")
    if precision.autocast:
        notes.append("mixed precision: the fp32 parameters are the master weights (no third copy)")
    if precision.fp8_recipe:
        kept = "1-byte casts" if precision.fp8_recipe == "delayed" else "their high-precision inputs (as bf16)"
        notes.append(f"fp8 {precision.fp8_recipe}: fp8 linears keep {kept}; a trained vision tower's fp8 layers count as bf16")
    return notes


def _lora_notes(model: VisionLanguageModel, nf4: frozenset[int]) -> list[str]:
    adapted = lora_modules(model)
    if not adapted:
        return []
    first = next(iter(adapted.values()))
    parts = sorted({name.split(".")[0] for name in adapted})
    notes = [f"LoRA rank {first.rank} on {len(adapted)} linears ({', '.join(parts)}): gradients and AdamW moments "
             "for the adapters and what the stage trains fully only"]
    if nf4:
        notes.append(f"QLoRA: the adapted weights in NF4, {NF4_BYTES:.3f} bytes each (4-bit codes, int8 block scales, "
                     "fp32 group factors)")
    return notes


def experts_per_token(moe: MoEFeedForward) -> float:
    """Experts a token runs through: top_k (token choice), on average capacity_factor or top_k (expert choice)."""
    c = moe.config
    return float(c.capacity_factor or c.top_k) if c.router == "expert_choice" else float(c.top_k)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters: an MoE layer's token uses its router, its shared
    experts and `experts_per_token` of its experts."""
    total = sum(p.numel() for p in model.parameters())
    idle = sum(moe.experts.w1.numel() * 3 * (1 - experts_per_token(moe) / moe.config.num_experts)
               for _, moe in moe_layers(model))
    return total, round(total - idle)


class MoEActivations(Activations):
    """Activations with MoE decoder layers: the layer as if its feed-forward were the dense SwiGLU
    of the experts a token runs through (and the shared ones), plus the dispatch tensors."""

    def decoder_layer(self, index: int, layer: nn.Module) -> int:
        moe = layer.feed_forward
        if not isinstance(moe, MoEFeedForward):
            return super().decoder_layer(index, layer)
        with torch.device("meta"):
            dense = FeedForward(moe.gate.in_features, width(moe)).requires_grad_(moe.experts.w1.requires_grad)
        proxy = copy.copy(layer)
        proxy._modules = {**layer._modules, "feed_forward": dense}
        return super().decoder_layer(index, proxy) + self.dispatch_bytes(moe)

    def workspace(self) -> tuple[int, int]:
        """A layer's backward holds two SwiGLU gradients of the widest feed-forward, dense or MoE."""
        loss, backward = super().workspace()
        widest = max((width(moe) for _, moe in moe_layers(self.model.text)), default=0)
        extra = 2 * self.rows * max(0, widest - self.model.text.config.hidden_dim) * self.p.compute // self.tp
        return loss, backward + (extra if self.text_grad else 0)

    def dispatch_bytes(self, moe: MoEFeedForward) -> int:
        """Router logits and scores (fp32); per assignment its gathered input row, its expert output
        and its weighted output (3 rows of dim), and the padded buffer where there is one."""
        c, dim = moe.config, moe.gate.in_features
        assignments = self.rows * experts_per_token(moe)
        buffer = padding(moe) if c.capacity_factor or c.router == "expert_choice" else 0.0  # the grouped path has none
        return round(self.rows * 2 * 4 * c.num_experts + assignments * dim * self.p.compute * (3 + buffer))


def width(moe: MoEFeedForward) -> int:
    """The hidden width of the dense SwiGLU whose activations match a token's path through `moe`:
    its experts (over the padded buffer's rows when there is one) and its shared experts."""
    routed = moe.experts.w1.shape[1] * experts_per_token(moe) * padding(moe)
    return round(routed) + (moe.shared.w1.out_features if moe.shared is not None else 0)


def padding(moe: MoEFeedForward) -> float:
    """Rows of the padded dispatch buffer per assignment: the capacity factor with a capacity (token
    choice), else 1 (the grouped path, or expert choice's exactly full buffer)."""
    c = moe.config
    return c.capacity_factor if c.capacity_factor and c.router == "token_choice" else 1.0


def _moe_notes(model: VisionLanguageModel) -> list[str]:
    layers = moe_layers(model)
    if not layers:
        return []
    c = layers[0][1].config
    total, active = parameter_counts(model.text)
    return [f"MoE: {len(layers)} of {len(model.text.layers)} decoder layers, {c.num_experts} experts, {c.router} "
            f"top-{c.top_k}: text parameters {total:,} in total, {active:,} active per token"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm memory", description="Per-device memory of training a recipe (no GPU "
                                     "needed). Other arguments (--trainer.* / --model.* / --data.*) override the recipe "
                                     "as for vlm fit.")
    parser.add_argument("--config", action="append", required=True, help="a recipe YAML; repeat to compose, as for vlm fit")
    parser.add_argument("--devices", type=int, help="devices in total (default: trainer.devices x trainer.num_nodes)")
    parser.add_argument("--batch-size", type=int, help="per-device batch size (default: data.batch_size)")
    parser.add_argument("--seq-len", type=int, help="padded sequence length, image tokens included (default: data.max_length)")
    parser.add_argument("--images-per-sample", type=int, default=1, help="images in each sample (default 1)")
    args, cli_args = parser.parse_known_args(argv)  # the rest: --trainer.* / --model.* / --data.* as for vlm fit
    try:
        estimate = estimate_memory(args.config, devices=args.devices, batch_size=args.batch_size, seq_len=args.seq_len,
                                   images_per_sample=args.images_per_sample, cli_args=cli_args)
    except (ValueError, argparse.ArgumentError) as err:
        print(f"vlm memory: {err}", file=sys.stderr)
        return 1
    print(estimate)
    return 0
