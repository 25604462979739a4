"""Run by tests/training/test_fsdp2.py as a subprocess (Lightning re-launches it once per rank).

Trains a tiny VLM for a few steps on fixed batches; each rank takes its slice of one global batch.
Writes losses per rank, the final full state dict (rank 0) and a checkpoint to --out.
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
from tiny_models import IMAGE_ID, batch_from, images, tiny_model  # noqa: E402
from training_helpers import Losses  # noqa: E402

from vlm.training.module import VLMModule  # noqa: E402
from vlm.training.optim import OptimConfig  # noqa: E402

GLOBAL_BATCH = 8


def global_batches(model, steps: int, text_only_rows: set[int]):
    """The same `steps` global batches on every rank: equal-length rows, one image per image row."""
    g = torch.Generator().manual_seed(123)
    out = []
    for step in range(steps):
        rows, imgs = [], []
        for r in range(GLOBAL_BATCH):
            tokens = torch.randint(10, 64, (8,), generator=g).tolist()
            if r in text_only_rows:
                rows.append([1, *tokens])
                imgs.append([])
            else:
                rows.append([1, IMAGE_ID, *tokens])
                imgs.append(images(1, seed=1000 * step + r))
        out.append((rows, imgs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fusion", default="llava")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--text-only-rank", type=int, default=None)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--plugin", default=None, help="e.g. fp8:tensorwise")
    parser.add_argument("--strategy", choices=["fsdp2", "ddp", "fsdp1"], default="fsdp2", help="for --devices > 1")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = tiny_model(args.fusion).config  # the tiny recipe; the module rebuilds it in configure_model
    module = VLMModule(config, stage="full", optim=OptimConfig(lr=1e-3, warmup_steps=1),
                       activation_checkpointing=args.activation_checkpointing)
    tp = args.tensor_parallel
    if args.devices == 1:
        strategy = "auto"
    elif args.strategy == "ddp":
        strategy = "ddp"
    elif args.strategy == "fsdp1":
        from vlm.training.parallel import FSDP1Strategy

        strategy = FSDP1Strategy(state_dict_type="sharded")
    else:
        strategy = ModelParallelStrategy(data_parallel_size=args.devices // tp, tensor_parallel_size=tp)
    plugins = []
    if args.plugin:
        from vlm.training.fp8 import Float8Precision

        plugins.append(Float8Precision(recipe=args.plugin.split(":")[1]))
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[losses], plugins=plugins)
    rank, world = trainer.global_rank // tp, trainer.world_size // tp  # data-parallel rank and size
    per_rank = GLOBAL_BATCH // world
    text_only = set(range(per_rank * args.text_only_rank, per_rank * (args.text_only_rank + 1))) if args.text_only_rank is not None else set()
    helper = tiny_model(args.fusion)
    data = [batch_from(helper, rows[rank * per_rank:(rank + 1) * per_rank], imgs[rank * per_rank:(rank + 1) * per_rank], labels=True)
            for rows, imgs in global_batches(helper, args.steps, text_only)]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None, collate_fn=lambda b: b))
    args.out.mkdir(parents=True, exist_ok=True)
    if trainer.global_rank % tp == 0:  # tensor-parallel ranks share one data-parallel loss
        (args.out / f"losses_rank{rank}.json").write_text(json.dumps(losses.values))
    trainer.save_checkpoint(args.out / "final.ckpt")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.global_rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, args.out / "full.safetensors")


if __name__ == "__main__":
    main()
