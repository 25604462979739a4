"""Run by tests/training/test_lora.py as a subprocess; Lightning starts the second rank by running
it again (with LOCAL_RANK set).

LoRA training of a tiny flamingo model (DoRA adapters on text and fusion linears, stage align) on
fixed global batches, each rank taking its slice; validation and checkpoints every --every steps.
Three runs, each writing losses_rank{r}.json, val_rank{r}.json and checkpoints/ under --out/<name>:
- `one`: one process, plain Lightning (in the launching process, before the second rank starts);
- `two`: 2 ranks under the strategy and activation checkpointing of configs/strategy/fsdp2.yaml
  (sharded checkpoint directories);
- `resumed`: the same 2 ranks again, resuming `two`'s step-`every` checkpoint.
"""

import argparse
import dataclasses
import importlib
import json
import os
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


@dataclasses.dataclass
class Run:
    steps: int
    every: int
    devices: int = 1
    sharded: bool = False  # configs/strategy/fsdp2.yaml
    resume: Path | None = None


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


def fit(run: Run, out: Path) -> None:
    strategy, checkpointing = strategy_from_recipe() if run.sharded else ("auto", False)
    torch.manual_seed(0)
    module = VLMModule(tiny_model("flamingo").config, stage="align", lora=LORA, caption_samples=0,
                       optim=OptimConfig(lr=1e-2, warmup_steps=1), activation_checkpointing=checkpointing)
    trainer = L.Trainer(accelerator="cpu", devices=run.devices, strategy=strategy, max_steps=run.steps, logger=False,
                        val_check_interval=run.every, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Losses(str(out)), ModelCheckpoint(out / "checkpoints", every_n_train_steps=run.every,
                                                                     save_top_k=-1, filename="{step}")])
    rank, world = trainer.global_rank, trainer.world_size
    helper, per_rank = tiny_model("flamingo"), GLOBAL_BATCH // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def loader(seed: int, steps: int, start: int = 0):
        data = [batch_from(helper, rows[mine], imgs[mine], labels=True) for rows, imgs in global_batches(steps, seed)]
        return torch.utils.data.DataLoader(data[start:], batch_size=None, collate_fn=lambda b: b)

    done = read_metadata(run.resume)["global_step"] if run.resume else 0  # a resumed run continues the batches
    trainer.fit(module, train_dataloaders=loader(123, run.steps, done), val_dataloaders=loader(7, 1), ckpt_path=run.resume)
    val = float(trainer.callback_metrics["val/loss"])  # the mean over ranks (sync_dist)
    (out / f"val_rank{rank}.json").write_text(json.dumps({"val_loss": val, "table": str(module.parameter_table)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # the launching process, before there is a second rank
        fit(Run(args.steps, args.every), args.out / "one")
    fit(Run(args.steps, args.every, devices=2, sharded=True), args.out / "two")
    # This process is now a launched rank: the next fit must not start another one.
    os.environ.setdefault("LOCAL_RANK", "0")
    checkpoint = args.out / "two" / "checkpoints" / f"step={args.every}.ckpt"
    fit(Run(args.steps, args.every, devices=2, sharded=True, resume=checkpoint), args.out / "resumed")


if __name__ == "__main__":
    main()
