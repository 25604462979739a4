"""The text backbone's adapters in PEFT's layout, for a Hugging Face `LlamaForCausalLM`:

    D/adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_dora, ...
    D/adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight      [r, in]
                                 base_model.model.<HF module>.lora_B.weight      [out, r]
                                 base_model.model.<HF module>.lora_magnitude_vector [out]  (DoRA)

Module names go through `vlm.checkpoints.ours_to_hf` / `hf_to_ours`, the mapping the weights use.
That mapping renames only: our rotary layout is Hugging Face's (only Meta's interleaves q/k rows),
so the adapters of `wq`/`wk` are stored as they are (the parity test against PEFT checks it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlm.adapters.apply import lora_modules, wrap_linears
from vlm.adapters.lora import LoRALinear
from vlm.checkpoints import hf_to_ours, ours_to_hf
from vlm.text.llama import Llama

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TENSORS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_PEFT_KEY = re.compile(rf"{re.escape(_PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# Settings of adapter_config.json that these adapters cannot express: their neutral values.
_NEUTRAL = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "lora_bias": False}


def save_peft_adapter(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None,
                      ignore_non_text: bool = False) -> None:
    """Write the adapters of the text backbone of `model` (a VisionLanguageModel or a Llama) to
    `path`, for `peft.PeftModel.from_pretrained(LlamaForCausalLM, path)`. Adapters on other parts
    are an error unless `ignore_non_text` (they are then not saved)."""
    text, prefix = _text_part(model)
    adapters = {n.removeprefix(prefix): m for n, m in lora_modules(model).items() if n.startswith(prefix)}
    others = sorted(n for n in lora_modules(model) if not n.startswith(prefix))
    if not adapters:
        raise ValueError("the text backbone has no LoRA adapter to save")
    if others and not ignore_non_text:
        raise ValueError(f"PEFT's Llama layout holds the text backbone only, but {others[0]} (and {len(others) - 1} "
                         "more) outside it have adapters: pass ignore_non_text=True to save the text ones alone")
    settings = {(m.rank, m.scaling, m.use_dora, _dropout(m)) for m in adapters.values()}
    if len(settings) > 1:
        raise ValueError(f"the text adapters differ in (rank, scaling, dora, dropout): {sorted(settings)}; "
                         "adapter_config.json holds one setting")
    rank, scaling, use_dora, dropout = settings.pop()
    tensors = {}
    for name, module in adapters.items():
        hf = _PREFIX + _hf_module(name)
        tensors[f"{hf}.{_TENSORS['lora_A']}"] = module.lora_A.detach().cpu().contiguous()
        tensors[f"{hf}.{_TENSORS['lora_B']}"] = module.lora_B.detach().cpu().contiguous()
        if use_dora:
            tensors[f"{hf}.{_TENSORS['magnitude']}"] = module.magnitude.detach().cpu().contiguous()
    alpha = rank * scaling
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
        "target_modules": _target_modules(text, adapters),
        "use_dora": use_dora, "init_lora_weights": True, "inference_mode": True, **_NEUTRAL,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_peft_adapter(model: nn.Module, path: str | Path, *, quantize_base: str | None = None) -> list[str]:
    """Put the adapters saved at `path` (PEFT layout, by PEFT or `save_peft_adapter`) on the text
    backbone of `model`: linears without an adapter get one (NF4 base with `quantize_base`), linears
    with one must have the same rank, scaling and DoRA. Returns the adapted names."""
    path = Path(path)
    config = _read_config(path / ADAPTER_CONFIG_FILE)
    rank, use_dora = config["r"], bool(config.get("use_dora", False))
    alpha, dropout = config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    state = _read_tensors(path / ADAPTER_WEIGHTS_FILE, prefix=_text_part(model)[1], use_dora=use_dora)
    names = sorted(state)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the adapter is for {name}, which the model does not have") from None
    fresh = [n for n in names if not isinstance(model.get_submodule(n), LoRALinear)]
    for name in sorted(set(names) - set(fresh)):
        module = model.get_submodule(name)
        if (module.rank, module.scaling, module.use_dora) != (rank, alpha / rank, use_dora):
            raise ValueError(f"{path}: {name} already has an adapter of rank {module.rank}, scaling "
                             f"{module.scaling:g}, dora {module.use_dora}; the file has rank {rank}, scaling "
                             f"{alpha / rank:g}, dora {use_dora}")
    wrap_linears(model, fresh, rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora, quantize_base=quantize_base)
    with torch.no_grad():
        for name, tensors in state.items():
            module = model.get_submodule(name)
            for attr, tensor in tensors.items():
                target = getattr(module, attr)
                if target.shape != tensor.shape:
                    raise ValueError(f"{path}: {name}.{attr} has shape {tuple(tensor.shape)}, the model's adapter "
                                     f"{tuple(target.shape)}")
                target.copy_(tensor)
    return names


def _text_part(model: nn.Module) -> tuple[Llama, str]:
    """The Llama of `model` and the prefix of its module names."""
    if isinstance(model, Llama):
        return model, ""
    if isinstance(getattr(model, "text", None), Llama):
        return model.text, "text."
    raise TypeError(f"expected a Llama or a model with a Llama `text` part, got {type(model).__name__}")


def _hf_module(name: str) -> str:
    """`layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj` (names relative to the Llama)."""
    hf = _hf_name(name)
    if hf is None:
        raise ValueError(f"{name} has no Hugging Face Llama name (vlm.checkpoints.ours_to_hf)")
    return hf


def _hf_name(name: str) -> str | None:
    try:
        return ours_to_hf(f"{name}.weight").removesuffix(".weight")
    except KeyError:
        return None


def _dropout(module: LoRALinear) -> float:
    return module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0


def _target_modules(text: nn.Module, adapters: dict[str, LoRALinear]) -> list[str]:
    """PEFT matches a target against the end of module names: the HF suffixes (`q_proj`) when they
    pick exactly the adapted modules, otherwise the full names."""
    adapted = {_hf_module(n) for n in adapters}
    suffixes = {n.rsplit(".", 1)[-1] for n in adapted}
    linears = [_hf_name(n) for n, m in text.named_modules()
               if isinstance(m, (nn.Linear, LoRALinear)) and not n.endswith(".base")]
    picked = {n for n in linears if n is not None and n.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if picked == adapted else sorted(adapted)


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (not a PEFT adapter directory)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type must be LORA, got {config.get('peft_type')!r}")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise ValueError(f"{file}: r must be a positive integer, got {config.get('r')!r}")
    for key, neutral in _NEUTRAL.items():
        if config.get(key) not in (neutral, None):
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported (only {neutral!r})")
    return config


def _read_tensors(file: Path, *, prefix: str, use_dora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{our full module name: {"lora_A": .., "lora_B": .., ["magnitude": ..]}}, every key checked."""
    attrs = {v: k for k, v in _TENSORS.items()}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(file)).items():
        match = _PEFT_KEY.fullmatch(key)
        try:
            ours = hf_to_ours(f"{match[1]}.weight").removesuffix(".weight") if match else None
        except KeyError:
            ours = None
        if ours is None:
            raise ValueError(f"{file}: tensor {key} is not a LoRA tensor of a Hugging Face Llama linear")
        state.setdefault(prefix + ours, {})[attrs[match[2]]] = tensor
    expected = {"lora_A", "lora_B", "magnitude"} if use_dora else {"lora_A", "lora_B"}
    for name, tensors in state.items():
        if set(tensors) != expected:
            raise ValueError(f"{file}: {name} has {sorted(tensors)}, expected {sorted(expected)} (use_dora={use_dora})")
    if not state:
        raise ValueError(f"{file} holds no LoRA tensors")
    return state
