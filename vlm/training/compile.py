"""Regional compilation (`model.compile: true`): `torch.compile` per block, as torchtitan does.

Each block (decoder layer, gated cross-attention block, Perceiver resampler, vision block; the
units of `vlm.training.parallel.blocks`) has its `forward` compiled, not the whole model. Blocks of
one class share their code, so they share their compiled graphs: compile time does not grow with
depth. What runs between blocks (embeddings, the fusion's `prepare`, the loss) stays eager, so it
may keep data-dependent shapes (the fused loss skips ignored positions).

Only `forward` is replaced, never the module: parameter names, checkpoints, activation
checkpointing's hooks and FSDP2's hooks (which gather parameters outside the compiled code) are
those of the eager model. Apply after fp8 conversion and activation checkpointing, before FSDP2.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vlm.training.parallel import blocks


def compile_blocks(units: Iterable[nn.Module], *, backend: str = "inductor", fullgraph: bool = True) -> int:
    """Compile each unit's forward with `backend` (`fullgraph`: a graph break is an error).
    Returns the count."""
    count = 0
    for unit in units:
        unit.forward = torch.compile(unit.forward, backend=backend, fullgraph=fullgraph)
        count += 1
    return count


def compile_model(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = True) -> int:
    """Compile every block of a VisionLanguageModel (see the module docstring). Returns the count."""
    model.text.packed_attention = "compiled"  # packed rows: no host-read sample bounds in compiled layers
    return compile_blocks(blocks(model), backend=backend, fullgraph=fullgraph)


def compile_backend(value: bool | str) -> str | None:
    """`model.compile`: false (None), true (inductor) or a `torch.compile` backend name such as
    `aot_eager` (traced like inductor, run eagerly: for finding graph breaks without the code
    generation's compile time)."""
    if value is False or value is None:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value in torch._dynamo.list_backends(exclude_tags=()):
        return value
    raise ValueError(f"model.compile must be true, false or a torch.compile backend "
                     f"({', '.join(torch._dynamo.list_backends(exclude_tags=()))}), got {value!r}")


def compile_statistics() -> dict[str, float]:
    """Graphs compiled so far in this process, and recompiles: compiles of a frame that had been
    compiled before but whose guards failed (a new sequence length before it became dynamic, a new
    dtype, ...). Each recompile records why its earlier cache entries failed; they are counted by
    their compile ids. A run over bucketed lengths (`data.pad_to_multiple_of`) should see both stop
    growing after its first steps."""
    from torch._dynamo.utils import counters, guard_failures

    failed_entries = {reason.split(":", 1)[0] for reasons in guard_failures.values() for reason in reasons}
    return {"compile/graphs": float(counters["stats"]["unique_graphs"]), "compile/recompiles": float(len(failed_entries))}
