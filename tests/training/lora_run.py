"""Run by tests/training/test_lora.py as a subprocess (Lightning re-launches it once per rank).

LoRA training of a tiny flamingo model (adapters on text and fusion linears, DoRA, stage align) on
fixed global batches, each rank taking its slice, under the strategy and activation checkpointing of
configs/strategy/fsdp2.yaml (on one device too: its checkpoints are sharded directories). Validation
every --every steps (its loss in out/val_rank{r}.json), checkpoints every --every steps
(out/checkpoints), losses per rank (out/losses_rank{r}.json). --resume: a checkpoint to continue.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
from tiny_models import IMAGE_ID, batch_from, images, tiny_model  # noqa: E402
from training_helpers import ROOT, Losses  # noqa: E402

from vlm.training.checkpointing import read_metadata  # noqa: E402
from vlm.training.module import VLMModule  # noqa: E402
from vlm.training.optim import OptimConfig  # noqa: E402

GLOBAL_BATCH = 8
LORA = {"rank": 4, "alpha": 8, "use_dora": True, "parts": ["text", "fusion"],
        "targets": ["text.*.attention.wq", "text.*.attention.wv", "text.*.feed_forward.w2", "fusion.blocks.*.to_q"]}


def global_batches(steps: int, seed: int) -> list:
    """The same `steps` global batches on every rank: equal-length rows, one image each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        rows = [[1, IMAGE_ID, *torch.randint(10, 64, (8,), generator=g).tolist()] for _ in range(GLOBAL_BATCH)]
        out.append((rows, [images(1, seed=seed + 100 * step + r) for r in range(GLOBAL_BATCH)]))
    return out


def strategy_from_recipe() -> tuple[object, bool]:
    """configs/strategy/fsdp2.yaml's strategy and its model.activation_checkpointing."""
    recipe = yaml.safe_load((ROOT / "configs" / "strategy" / "fsdp2.yaml").read_text())
    spec = recipe["trainer"]["strategy"]
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec["init_args"]), recipe["model"]["activation_checkpointing"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    strategy, checkpointing = strategy_from_recipe()
    torch.manual_seed(0)
    module = VLMModule(tiny_model("flamingo").config, stage="align", lora=LORA, caption_samples=0,
                       optim=OptimConfig(lr=1e-2, warmup_steps=1), activation_checkpointing=checkpointing)
    losses = Losses(str(args.out))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
                        val_check_interval=args.every, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[losses, ModelCheckpoint(args.out / "checkpoints", every_n_train_steps=args.every,
                                                           save_top_k=-1, filename="{step}")])
    rank, world = trainer.global_rank, trainer.world_size
    helper, per_rank = tiny_model("flamingo"), GLOBAL_BATCH // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def loader(seed: int, steps: int, start: int = 0):
        data = [batch_from(helper, rows[mine], imgs[mine], labels=True) for rows, imgs in global_batches(steps, seed)]
        return torch.utils.data.DataLoader(data[start:], batch_size=None, collate_fn=lambda b: b)

    done = read_metadata(args.resume)["global_step"] if args.resume else 0  # a resumed run continues the batches
    trainer.fit(module, train_dataloaders=loader(123, args.steps, done), val_dataloaders=loader(7, 1),
                ckpt_path=args.resume)
    val = float(trainer.callback_metrics["val/loss"])  # the mean over ranks (sync_dist)
    (args.out / f"val_rank{rank}.json").write_text(json.dumps({"val_loss": val, "table": str(module.parameter_table)}))


if __name__ == "__main__":
    main()
