"""Run by tests/training/test_dpo.py as a subprocess (Lightning re-launches it once per rank).

DPO of a tiny VLM for a few steps on fixed preference batches; each rank takes its slice of the
pairs of one global batch (--text-only: pairs of the global batch without an image). Writes, per
rank, the losses and the reference's weights hash before and after training to --out.
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
from tiny_models import IMAGE_ID, images, tiny_model  # noqa: E402
from training_helpers import Losses  # noqa: E402

from vlm.data.collate import Collator  # noqa: E402
from vlm.data.formats import EncodedPreference  # noqa: E402
from vlm.features import weights_hash  # noqa: E402
from vlm.training.module import VLMModule  # noqa: E402
from vlm.training.optim import OptimConfig  # noqa: E402

GLOBAL_PAIRS = 4


def global_pairs(steps: int, text_only: set[int]) -> list[list[EncodedPreference]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for step in range(steps):
        pairs = []
        for index in range(GLOBAL_PAIRS):
            prompt = [1, *([] if index in text_only else [IMAGE_ID]), *torch.randint(10, 64, (3,), generator=g).tolist()]
            chosen, rejected = (torch.randint(10, 64, (n,), generator=g).tolist() for n in (4, 5))
            pairs.append(EncodedPreference(f"{step}_{index}", prompt + chosen, [-100] * len(prompt) + chosen,
                                           prompt + rejected, [-100] * len(prompt) + rejected,
                                           [] if index in text_only else images(1, seed=100 * step + index)))
        out.append(pairs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fusion", default="llava")
    parser.add_argument("--text-only", type=int, nargs="*", default=[], help="indices of pairs without an image")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = tiny_model(args.fusion).config
    module = VLMModule(config, stage="instruct", objective="dpo", optim=OptimConfig(lr=3e-3, warmup_steps=1))
    strategy = "auto" if args.devices == 1 else ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[losses])
    rank, world = trainer.global_rank, trainer.world_size
    per_rank = GLOBAL_PAIRS // world
    collate = Collator(pad_id=0, image_id=IMAGE_ID, image_token_count=tiny_model(args.fusion).tokens_per_image)
    data = [collate(pairs[rank * per_rank:(rank + 1) * per_rank]) for pairs in global_pairs(args.steps, set(args.text_only))]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None, collate_fn=lambda b: b))
    after = weights_hash(module.reference.model)  # gathers sharded tensors: every rank joins
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps({"losses": losses.values, "fingerprint": module.reference.fingerprint,
                                                           "reference_after": after}))


if __name__ == "__main__":
    main()
