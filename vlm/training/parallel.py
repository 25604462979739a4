"""Sharding and activation checkpointing, applied to a built model from the training side.

The unit of both is the *block*: each decoder layer, each gated cross-attention block, the
Perceiver resampler, and each block of the vision tower. FSDP2 (`fully_shard`) wraps every block
and then the root; FSDP1 (Lightning's `FSDPStrategy`) gets the same units as an auto-wrap policy.
Activation checkpointing uses torch's composable `checkpoint`, which keeps parameter names.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed._composable import checkpoint

from vlm.fusion.flamingo import GatedCrossAttentionBlock, PerceiverResampler
from vlm.text.llama import DecoderLayer
from vlm.training.checkpointing import start_sharded_save

_VISION_BLOCK_LISTS = ("blocks", "resblocks", "layers")  # timm ViTs, open_clip transformers, hf_vit encoder.layers


def vision_blocks(vision: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a vision tower (timm `blocks`, open_clip `transformer.resblocks`, hf_vit
    `encoder.layers`)."""
    found: list[nn.Module] = []
    for name, module in vision.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and name.rsplit(".", 1)[-1] in _VISION_BLOCK_LISTS:
            found += list(module)
    return found


def blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of a VisionLanguageModel, in a stable order: vision, fusion, text."""
    fusion = [m for m in model.fusion.modules() if isinstance(m, (GatedCrossAttentionBlock, PerceiverResampler))]
    return [*vision_blocks(model.vision), *fusion, *model.text.layers]


def block_classes(model: nn.Module | None = None) -> set[type[nn.Module]]:
    """Classes for FSDP1's auto-wrap policy (the strategy exists before the model does)."""
    classes: set[type[nn.Module]] = {DecoderLayer, GatedCrossAttentionBlock, PerceiverResampler}
    try:
        from timm.models.vision_transformer import Block

        classes.add(Block)
    except ImportError:
        pass
    from vlm.vision.hf_vit import EncoderLayer

    classes.add(EncoderLayer)
    try:
        from open_clip.transformer import ResidualAttentionBlock

        classes.add(ResidualAttentionBlock)
    except ImportError:
        pass
    if model is not None:
        classes |= {type(b) for b in blocks(model)}
    return classes


def apply_activation_checkpointing(units: Iterable[nn.Module]) -> int:
    """Recompute each unit's activations in backward instead of keeping them. Returns the count."""
    count = 0
    for unit in units:
        checkpoint(unit)
        count += 1
    return count


def apply_fsdp2(model: nn.Module, mesh: Any, *, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> None:
    """fully_shard every block, then the root (whose forward gathers what no block holds)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in blocks(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def apply_tensor_parallel(text: nn.Module, mesh: Any) -> None:
    """Megatron-style tensor parallelism inside each decoder layer: q/k/v and the SwiGLU up
    projections split by output features, o and the down projection by input features (one
    all-reduce each). Attention heads are split across ranks; embeddings and the head stay whole."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    size, config = mesh.size(), text.config
    if config.moe is not None:
        raise ValueError("tensor_parallel_size > 1 does not split MoE feed-forwards (model.config.text.moe): "
                         "use data parallelism (configs/strategy/fsdp2.yaml with tensor_parallel_size 1)")
    if config.n_kv_heads % size or config.hidden_dim % size:
        raise ValueError(f"tensor_parallel_size {size} must divide n_kv_heads ({config.n_kv_heads}) and hidden_dim ({config.hidden_dim})")
    plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel()}
    for layer in text.layers:
        parallelize_module(layer, mesh, plan)


class unsharded_root:
    """Gather the root's parameters for code that does not go through the root's forward
    (`generate`, which calls the pieces directly); a no-op for unsharded models."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        if hasattr(self.model, "unshard"):
            self.model.unshard()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        if hasattr(self.model, "reshard"):
            self.model.reshard()


class _SafeShardedSave:
    """Rank 0 deletes a sharded directory's completion files before it is rewritten (see
    `vlm.training.checkpointing`), so that a crash mid-save never leaves a resumable mix of steps."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(filepath))
        if self.global_rank == 0 and path.is_dir():
            start_sharded_save(path)
        super().save_checkpoint(checkpoint, filepath, storage_options)


class FSDP1Strategy(_SafeShardedSave, FSDPStrategy):
    """Lightning's FSDPStrategy with vlm's blocks as the auto-wrap (and checkpointing) policy.

    Args:
        activation_checkpointing: recompute each block in backward.
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD.
        state_dict_type: "sharded" (one file per rank) or "full".
        cpu_offload: keep sharded parameters on the CPU between uses.
        limit_all_gathers: bound the all-gathers in flight (saves memory).
    """

    def __init__(self, *, activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "sharded", cpu_offload: bool = False, limit_all_gathers: bool = True) -> None:
        classes = block_classes()
        super().__init__(
            auto_wrap_policy=classes,
            activation_checkpointing_policy=classes if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            limit_all_gathers=limit_all_gathers,
        )


class FSDP2Strategy(_SafeShardedSave, ModelParallelStrategy):
    """Lightning's ModelParallelStrategy for data-parallel FSDP2: by default every process is one
    data-parallel rank (Lightning's own default would make them tensor-parallel ranks). The module
    applies `fully_shard` per block in `configure_model` (see VLMModule)."""

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int = 1, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        super().setup_environment()
