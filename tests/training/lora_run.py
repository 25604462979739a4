"""Run by tests/training/test_lora.py as a subprocess; Lightning starts the second rank by running
it again (with LOCAL_RANK set).

Two variants on fixed global batches, each rank taking its slice; validation and checkpoints every
--every steps:
- `lora`: a tiny flamingo model, DoRA adapters on text and fusion linears (stage align);
- `qlora`: a tiny llava model whose feed-forward linears (512 x 64, two NF4 scale groups each, so
  their NF4 bases shard over 2 ranks) get adapters on NF4 bases (stage align);
- `dpo_qlora`: `qlora` trained by DPO on preference pairs (its reference: the policy itself,
  adapters disabled and the projector at its starting values).
Three runs of each, each writing losses_rank{r}.json, val_rank{r}.json and checkpoints/ under
--out/<variant>/<name>:
- `one`: one process, plain Lightning (in the launching process, before the second rank starts);
- `two`: 2 ranks under the strategy and activation checkpointing of configs/strategy/fsdp2.yaml
  (sharded checkpoint directories);
- `resumed`: the same 2 ranks again, resuming `two`'s step-`every` checkpoint.
val_rank{r}.json also holds, per training step and per validation batch, how many times FSDP2
all-gathered an NF4 base (torchao's `NF4Tensor.fsdp_pre_all_gather` calls), and the local shards of
the NF4 bases after training (their class and shape).
"""

import argparse
import dataclasses
import functools
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

from vlm.data.collate import Collator  # noqa: E402
from vlm.training.checkpointing import read_metadata  # noqa: E402
from vlm.training.module import VLMModule  # noqa: E402
from vlm.training.optim import OptimConfig  # noqa: E402

GLOBAL_BATCH = 8
VARIANTS = {
    "lora": ("flamingo", {}, {"rank": 4, "alpha": 8, "use_dora": True, "parts": ["text", "fusion"],
                              "targets": ["text.*.attention.wq", "text.*.attention.wv", "text.*.feed_forward.w2",
                                          "fusion.blocks.*.to_q"]}),
    "qlora": ("llava", {"hidden_dim": 512}, {"rank": 4, "alpha": 8, "parts": ["text"], "quantize_base": "nf4",
                                             "targets": ["text.*.feed_forward.*"]}),
}
VARIANTS["dpo_qlora"] = VARIANTS["qlora"]  # objective dpo on preference pairs: its reference is the policy, adapters off


@dataclasses.dataclass
class Run:
    variant: str
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


class NF4Gathers(L.Callback):
    """Counts NF4 all-gathers (`fsdp_pre_all_gather` of torchao's NF4Tensor, wrapped once per
    process) during each training step (`train`) and each validation batch (`val`)."""

    calls = 0

    def __init__(self) -> None:
        from torchao.quantization import NF4Tensor

        original = NF4Tensor.fsdp_pre_all_gather
        if not getattr(original, "counted", False):
            @functools.wraps(original)  # FSDP2 reads its signature to choose how to call it
            def counted(*args, **kwargs):
                NF4Gathers.calls += 1
                return original(*args, **kwargs)

            counted.counted = True
            NF4Tensor.fsdp_pre_all_gather = counted
        self.train, self.val, self.start = [], [], 0

    def on_train_batch_start(self, *args) -> None:
        self.start = NF4Gathers.calls

    def on_train_batch_end(self, *args) -> None:
        self.train.append(NF4Gathers.calls - self.start)

    def on_validation_batch_start(self, *args) -> None:
        self.start = NF4Gathers.calls

    def on_validation_batch_end(self, *args) -> None:
        self.val.append(NF4Gathers.calls - self.start)


def local_nf4_shards(model: torch.nn.Module) -> dict[str, list]:
    """Adapted base name -> [class of its local tensor, its shape]."""
    from vlm.adapters import lora_modules

    shards = {}
    for name, module in lora_modules(model).items():
        weight = module.base.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        shards[name] = [type(local).__name__, list(local.shape)]
    return shards


def global_pairs(steps: int, seed: int) -> list:
    """The same `steps` global batches of GLOBAL_BATCH preference pairs on every rank, one image each."""
    from vlm.data.formats import EncodedPreference

    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        pairs = []
        for index in range(GLOBAL_BATCH):
            prompt = [1, IMAGE_ID, *torch.randint(10, 64, (3,), generator=g).tolist()]
            chosen, rejected = (torch.randint(10, 64, (4,), generator=g).tolist() for _ in range(2))
            pairs.append(EncodedPreference(f"{seed}_{step}_{index}", prompt + chosen, [-100] * len(prompt) + chosen,
                                           prompt + rejected, [-100] * len(prompt) + rejected,
                                           images(1, seed=seed + 100 * step + index)))
        out.append(pairs)
    return out


def strategy_from_recipe() -> tuple[object, bool]:
    """configs/strategy/fsdp2.yaml's strategy and its model.activation_checkpointing."""
    recipe = yaml.safe_load((ROOT / "configs" / "strategy" / "fsdp2.yaml").read_text())
    spec = recipe["trainer"]["strategy"]
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec["init_args"]), recipe["model"]["activation_checkpointing"]


def fit(run: Run, out: Path) -> None:
    strategy, checkpointing = strategy_from_recipe() if run.sharded else ("auto", False)
    fusion, text, lora = VARIANTS[run.variant]
    helper = tiny_model(fusion)
    config = dataclasses.replace(helper.config, text=dataclasses.replace(helper.config.text, **text))
    torch.manual_seed(0)
    objective = "dpo" if run.variant.startswith("dpo") else "next_token"
    module = VLMModule(config, stage="align", lora=lora, caption_samples=0, objective=objective,
                       optim=OptimConfig(lr=1e-2, warmup_steps=1), activation_checkpointing=checkpointing)
    trainer = L.Trainer(accelerator="cpu", devices=run.devices, strategy=strategy, max_steps=run.steps, logger=False,
                        val_check_interval=run.every, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[gathers := NF4Gathers(), Losses(str(out)), ModelCheckpoint(out / "checkpoints", every_n_train_steps=run.every,
                                                                     save_top_k=-1, filename="{step}")])
    rank, world = trainer.global_rank, trainer.world_size
    per_rank = GLOBAL_BATCH // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def loader(seed: int, steps: int, start: int = 0):
        if objective == "dpo":
            collate = Collator(pad_id=0, image_id=IMAGE_ID, image_token_count=helper.tokens_per_image)
            data = [collate(pairs[mine]) for pairs in global_pairs(steps, seed)]
        else:
            data = [batch_from(helper, rows[mine], imgs[mine], labels=True) for rows, imgs in global_batches(steps, seed)]
        return torch.utils.data.DataLoader(data[start:], batch_size=None, collate_fn=lambda b: b)

    done = read_metadata(run.resume)["global_step"] if run.resume else 0  # a resumed run continues the batches
    trainer.fit(module, train_dataloaders=loader(123, run.steps, done), val_dataloaders=loader(7, 1), ckpt_path=run.resume)
    val = float(trainer.callback_metrics["val/loss"])  # the mean over ranks (sync_dist)
    record = {"val_loss": val, "table": str(module.parameter_table), "train_gathers": gathers.train,
              "val_gathers": gathers.val, "nf4_shards": local_nf4_shards(module.model)}
    (out / f"val_rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # the launching process, before there is a second rank
        for variant in VARIANTS:
            fit(Run(variant, args.steps, args.every), args.out / variant / "one")
    for variant in VARIANTS:
        fit(Run(variant, args.steps, args.every, devices=2, sharded=True), args.out / variant / "two")
        # This process is now a launched rank: the next fit must not start another one.
        os.environ.setdefault("LOCAL_RANK", "0")
        checkpoint = args.out / variant / "two" / "checkpoints" / f"step={args.every}.ckpt"
        fit(Run(variant, args.steps, args.every, devices=2, sharded=True, resume=checkpoint), args.out / variant / "resumed")


if __name__ == "__main__":
    main()
