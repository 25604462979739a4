"""LoRA and QLoRA in training (`model.lora`): adapters on a frozen base, checkpoints of the trained
tensors only, and the base rebuilt, checked and re-adapted on resume and export.

`VLMModule.configure_model` builds the starting model (text checkpoint, init checkpoint), puts the
adapters on (`vlm.adapters.apply_lora`, base weights still dense), lets the stage choose what else
trains (`vlm.stages.set_trainable` keeps every adapted base frozen), then records the base:

- `frozen`: the parameters that do not train. A LoRA run's checkpoints leave them out (the module's
  `state_dict` drops them), so a checkpoint holds the adapters, whatever the stage trains fully
  (e.g. the projector) and the buffers.
- its identity, stored in every checkpoint under `CHECKPOINT_KEY`: the text and init checkpoint
  paths, the sha256 of the frozen weights, and the RNG state the model was built from (parts that
  no checkpoint covers are a seeded random initialisation). Resuming, exporting or initialising
  from the checkpoint rebuilds the base the same way and refuses a base whose hash differs.

QLoRA (`quantize_base: nf4`) quantises the adapted bases after the precision plugin's conversion
(torchao's NF4 re-quantises on a dtype change) and before sharding; the hash is of the dense weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.adapters import LoRAConfig, apply_lora, lora_modules
from vlm.adapters.nf4 import BLOCK_SIZE, is_nf4, quantize_nf4, scaler_block_size
from vlm.errors import UserError
from vlm.model import VisionLanguageModel, VLMConfig, build_model
from vlm.stages import set_trainable

CHECKPOINT_KEY = "lora_base"


@dataclasses.dataclass
class LoRASettings(LoRAConfig):
    """`model.lora` of a recipe: `vlm.adapters.LoRAConfig`, whose errors name the recipe key."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as error:
            raise ValueError(str(error).replace("LoRAConfig.", "model.lora.")) from None


def lora_settings(value: LoRAConfig | Mapping[str, Any] | None) -> LoRAConfig | None:
    """`model.lora` as given in Python or YAML: None, a LoRAConfig, or a dict of its fields."""
    if value is None or isinstance(value, LoRAConfig):
        return value
    known = [f.name for f in dataclasses.fields(LoRAConfig)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"model.lora: unknown keys {unknown}; known keys: {known}")
    return LoRASettings(**value)


class LoRARun:
    """The LoRA side of one VLMModule (or of one checkpoint being rebuilt)."""

    def __init__(self, config: LoRAConfig, *, text_checkpoint: str | None, init_checkpoint: str | None) -> None:
        self.config = config
        self.text_checkpoint, self.init_checkpoint = _absolute(text_checkpoint), _absolute(init_checkpoint)
        self.frozen: set[str] = set()  # parameter names in the VisionLanguageModel
        self.sha256: str | None = None
        self.rng_state: torch.Tensor | None = None  # torch's CPU RNG state before build_model
        self.dtype: str | None = None  # of the frozen weights when hashed
        self.quantized_dtype: str | None = None  # of the adapted bases when quantised

    def before_build(self) -> None:
        self.rng_state = torch.get_rng_state()

    def apply(self, model: nn.Module) -> list[str]:
        """Adapters on `model`, bases dense (quantised later, by `quantize`)."""
        try:
            return apply_lora(model, dataclasses.replace(self.config, quantize_base=None))
        except ValueError as error:  # a target that matches nothing, a tied weight: the recipe's to fix
            raise UserError(str(error).replace("LoRAConfig.", "model.lora.")) from None

    def record_base(self, model: nn.Module) -> None:
        """After `set_trainable`: the frozen parameters, and their hash."""
        params = dict(model.named_parameters())
        self.frozen = {name for name, param in params.items() if not param.requires_grad}
        self.sha256 = frozen_hash(model, self.frozen)
        self.dtype = _dtype_name(next((params[n].dtype for n in sorted(self.frozen)), torch.float32))

    def prepare(self, model: nn.Module, trainer: Any, mesh: Any) -> nn.Module:
        """In `VLMModule._parallelize`, before sharding: QLoRA's quantisation, after the precision
        plugin's conversion (done here unless the mesh path has done it already)."""
        if self.config.quantize_base is None:
            return model
        if trainer is not None and type(trainer.precision_plugin).__name__ == "Float8Precision":
            raise UserError("model.lora.quantize_base nf4 does not combine with fp8 (configs/precision/fp8.yaml): "
                            "the adapted linears' bases are NF4, not fp8; drop one of them")
        if trainer is not None and mesh is None:
            model = trainer.precision_plugin.convert_module(model)  # Lightning's own conversion is then a no-op
        if mesh is not None and (mesh["data_parallel"].size() == 1 or mesh["tensor_parallel"].size() > 1):
            raise UserError("model.lora.quantize_base nf4 under configs/strategy/fsdp2.yaml needs 2 or more data-parallel "
                            "ranks and no tensor parallelism (torchao's NF4 cannot be gathered from one rank nor split "
                            "Megatron-style): on one device, train without the FSDP2 strategy")
        self.quantize(model, data_parallel=mesh["data_parallel"].size() if mesh is not None else 1)
        return model

    def quantize(self, model: nn.Module, *, data_parallel: int = 1) -> None:
        """QLoRA: the adapted bases to NF4 in their current dtype (a no-op for plain LoRA)."""
        if self.config.quantize_base != "nf4":
            return
        dense = {name: module for name, module in lora_modules(model).items() if not is_nf4(module.base.weight)}
        for name, module in dense.items():  # all checked first: a refusal leaves the model unchanged
            weight = module.base.weight
            groups = weight.numel() // BLOCK_SIZE // scaler_block_size(weight.numel())
            if data_parallel > 1 and (groups % data_parallel or weight.shape[0] % data_parallel):
                raise UserError(f"model.lora.quantize_base nf4 under FSDP2 on {data_parallel} ranks: {name} "
                                f"({list(weight.shape)}) has {groups} NF4 scale group(s); sharding needs its rows and "
                                f"groups divisible by {data_parallel} (leave it out of model.lora.targets)")
        for module in dense.values():
            weight = module.base.weight
            module.base.weight = nn.Parameter(quantize_nf4(weight), requires_grad=False)
            self.quantized_dtype = _dtype_name(weight.dtype)

    def trainable_state(self, state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """`state` (a state dict whose model keys start with `prefix`) without the frozen parameters."""
        for name in self.frozen:
            state.pop(prefix + name, None)
        return state

    def identity(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "text_checkpoint": self.text_checkpoint, "init_checkpoint": self.init_checkpoint,
                "rng_state": self.rng_state, "dtype": self.dtype, "quantized_dtype": self.quantized_dtype,
                "lora": self.config.to_dict()}

    def check_checkpoint(self, checkpoint: Mapping[str, Any], expected: set[str], *, source: str) -> None:
        """On resume: the checkpoint's base is this run's, and a checkpoint file holds exactly the
        tensors `expected` (the module's state dict; a sharded directory's are checked as loaded)."""
        self.check(checkpoint.get(CHECKPOINT_KEY), source=source)
        if "state_dict" in checkpoint:
            stored = set(checkpoint["state_dict"])
            missing, unexpected = sorted(expected - stored), sorted(stored - expected)
            if missing or unexpected:
                raise UserError(f"{source}: its tensors do not match this run's trainable ones (model.lora, model.stage): "
                                f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    def check(self, stored: Mapping[str, Any] | None, *, source: str) -> None:
        """UserError unless `stored` (a checkpoint's identity) names the base this run has built."""
        if stored is None:
            raise UserError(f"{source} is not a checkpoint of a LoRA run (it holds the whole model): start from it "
                            "with model.init_checkpoint instead of resuming it with model.lora")
        if stored.get("sha256") != self.sha256:
            raise UserError(f"{source} was trained on the base {_describe(stored)} (frozen weights sha256 "
                            f"{str(stored.get('sha256'))[:12]}), but the configured base {_describe(self.identity())} "
                            f"hashes to {str(self.sha256)[:12]}: use the same base (model.text_checkpoint, "
                            "model.init_checkpoint, model.config, model.stage)")


def frozen_hash(model: nn.Module, names: Iterable[str]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the parameters `names` (dense ones)."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = params[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def is_lora_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    return CHECKPOINT_KEY in checkpoint


def model_from_lora_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> VisionLanguageModel:
    """The adapted model of a LoRA run's checkpoint (a file's contents or a sharded directory's
    `meta.pt`): its base rebuilt as the run built it and checked against the stored hash, its
    adapters and other trained tensors loaded, NF4 bases quantised again as in training."""
    from vlm.training.checkpointing import read_sharded_model_state
    from vlm.training.module import initial_state

    path, hparams, stored = Path(path), checkpoint["hyper_parameters"], checkpoint[CHECKPOINT_KEY]
    run = LoRARun(LoRAConfig.from_dict(stored["lora"]), text_checkpoint=stored["text_checkpoint"],
                  init_checkpoint=stored["init_checkpoint"])
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(stored["rng_state"])
        model = build_model(VLMConfig.from_dict(hparams["config"]))
    if run.text_checkpoint:
        model.load_text_backbone(run.text_checkpoint)
    if run.init_checkpoint:
        model.load_state_dict(initial_state(run.init_checkpoint, model.state_dict()), strict=True)
    model.to(getattr(torch, stored["dtype"]))  # as the run had it when hashing (bf16-true builds in bf16)
    run.apply(model)
    set_trainable(model, hparams["stage"], include=hparams["include"], exclude=hparams["exclude"])
    run.record_base(model)
    run.check(stored, source=str(path))
    template = run.trainable_state(model.state_dict())
    if path.is_dir():
        state = read_sharded_model_state(path, template)
    else:
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        missing, unexpected = sorted(set(template) - set(state)), sorted(set(state) - set(template))
        if missing or unexpected:
            raise ValueError(f"{path}: the trained tensors do not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)  # the frozen base is the one just built and checked
    if stored["quantized_dtype"]:
        for module in lora_modules(model).values():
            module.base.to(getattr(torch, stored["quantized_dtype"]))
        run.quantize(model)
    return model.eval()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _describe(identity: Mapping[str, Any]) -> str:
    named = [f"{key} {identity[key]}" for key in ("text_checkpoint", "init_checkpoint") if identity.get(key)]
    return " + ".join(named) if named else "(seeded random initialisation)"
