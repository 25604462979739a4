"""LoRA, DoRA and QLoRA (NF4 base weights from torchao) on any nn.Linear of a model, by name.

    config = LoRAConfig(rank=8, alpha=16, targets=["*.attention.wq", "*.attention.wv"], parts=["text"])
    names = apply_lora(model, config)          # base weights frozen; adapters trainable
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    ...
    torch.save(adapter_state_dict(model), "adapter.pt")    # adapters only
    save_peft_adapter(model, "out/", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    with adapters_disabled(model): ...         # the base alone (e.g. DPO's reference)
    merge_lora(model)                          # plain nn.Linear again, un-adapted state-dict keys

No Lightning here, and nothing about fusions: parts are top-level submodules, targets are globs.
"""

from vlm.adapters.apply import (
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter_state_dict,
    lora_modules,
    lora_parameters,
    merge_lora,
    wrap_linears,
)
from vlm.adapters.config import DEFAULT_TARGETS, LoRAConfig
from vlm.adapters.lora import LoRALinear
from vlm.adapters.peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "adapter_state_dict",
    "adapters_disabled",
    "apply_lora",
    "load_adapter_state_dict",
    "load_peft_adapter",
    "lora_modules",
    "lora_parameters",
    "merge_lora",
    "save_peft_adapter",
    "wrap_linears",
]
