"""`vlm export --checkpoint C --out D`: a Lightning checkpoint -> a model directory that
`vlm.load_model(D)` and `vlm caption --model D` read without Lightning.

A LoRA run's checkpoint (adapters and trained tensors only) is exported with its base rebuilt and
checked (`vlm.training.lora`): merged by default (`--merge-lora`), or with `--no-merge-lora` as the
base plus its adapters (the text backbone's in PEFT's layout, see `vlm.export`).

`--format transformers` writes a llava-hf directory instead (`vlm.checkpoints.llava_hf`): what
`transformers.LlavaForConditionalGeneration`, its processor and vLLM load; adapters merged."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from vlm.checkpoints.llava_hf import save_llava_hf
from vlm.errors import UserError
from vlm.export import save_model
from vlm.model import VisionLanguageModel, VLMConfig, build_model
from vlm.text.tokenizer import Tokenizer
from vlm.training.checkpointing import read_metadata, read_sharded_model_state
from vlm.training.lora import is_lora_checkpoint, model_from_lora_checkpoint


def model_from_checkpoint(path: str | Path) -> tuple[VisionLanguageModel, dict]:
    """Rebuild the model of a VLMModule checkpoint: a file, or the directory a sharded run (FSDP1
    or FSDP2) writes. Everything is read with weights_only=True / as tensors; returns (model, metadata).
    A LoRA run's model comes with its adapters (unmerged)."""
    path = Path(path)
    checkpoint = read_metadata(path)
    if is_lora_checkpoint(checkpoint):
        return model_from_lora_checkpoint(checkpoint, path), checkpoint
    model = _build(checkpoint, path)
    if path.is_dir():  # every rank's shards read whole in this process (no process group needed)
        model.load_state_dict(read_sharded_model_state(path, model.state_dict()), strict=True)
        return model.eval(), checkpoint
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state_dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), checkpoint


def _build(checkpoint: dict, path: Path) -> VisionLanguageModel:
    try:
        config = VLMConfig.from_dict(checkpoint["hyper_parameters"]["config"])
    except KeyError as err:
        raise ValueError(f"{path}: not a vlm training checkpoint (no {err} entry)") from err
    # The weights come from the checkpoint, not from the tower's original source.
    config.vision = dataclasses.replace(config.vision, checkpoint_path=None, pretrained=False)
    return build_model(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm export", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by `vlm fit` (a file, or a sharded run's directory)")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one the run trained with)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    parser.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                        help="a LoRA run: merge the adapters into the weights (default), or write the base and the "
                             "adapters (text: PEFT layout in OUT/adapter) with --no-merge-lora")
    parser.add_argument("--format", choices=("vlm", "transformers"), default="vlm",
                        help="vlm: a vlm model directory (default); transformers: a llava-hf directory for "
                             "transformers' LlavaForConditionalGeneration and vLLM (llava fusion, mlp2x_gelu "
                             "projector, hf_vit or open_clip ViT tower; adapters merged)")
    args = parser.parse_args(argv)
    try:
        model, checkpoint = model_from_checkpoint(args.checkpoint)
        tokenizer_path = args.tokenizer or checkpoint.get("VLMDataModule", {}).get("tokenizer")
        if tokenizer_path is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer recorded; pass --tokenizer")
        tokenizer = Tokenizer.from_file(tokenizer_path)
        if args.format == "transformers":
            if not args.merge_lora:
                raise ValueError("--no-merge-lora keeps adapters beside the base in vlm's layout; --format "
                                 "transformers always merges them")
            save_llava_hf(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
        else:
            save_model(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, merge_lora=args.merge_lora)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"vlm export: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {args.out}")
    return 0
