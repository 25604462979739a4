"""GPU throughput of a ~1B LLaVA-style model (Llama-3.2-1B shape + CLIP ViT-L/14 shape, random
weights) at seq 2048: bf16 vs fp8 training steps, tokens/s and MFU. Run by scripts/gpu_check.sh.

    python scripts/gpu_bench.py --steps 10 --batch-size 4 --recipes bf16 tensorwise rowwise delayed
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlm.fusion import FusionConfig
from vlm.model import ModelInput, VLMConfig, build_model
from vlm.stages import set_trainable
from vlm.text.llama import LlamaConfig
from vlm.text.rope import RopeScaling
from vlm.vision import VisionConfig

H200_BF16_DENSE_TFLOPS = 989.0  # vendor peak, dense bf16; fp8 peaks are twice that


def llava_1b() -> VLMConfig:
    text = LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128257, hidden_dim=8192,
                       rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0), max_seq_len=4096, tie_embeddings=True)
    vision = VisionConfig(name="open_clip", model="ViT-L-14", feature_layer=-2, frozen=False)
    return VLMConfig(text=text, vision=vision, fusion=FusionConfig("llava", {"projector": "mlp2x_gelu"}), image_token_id=128256)


def batch(model, batch_size: int, seq: int, device: str) -> ModelInput:
    image_tokens = model.tokens_per_image
    ids = torch.randint(0, 128000, (batch_size, seq), device=device)
    ids[:, 1 : 1 + image_tokens] = model.config.image_token_id
    labels = ids.clone()
    labels[:, : 1 + image_tokens] = -100
    pixels = torch.randn(batch_size, 3, 224, 224, device=device)
    return ModelInput(ids, None, pixels, torch.arange(batch_size, device=device), labels)


def train_flops_per_step(model, batch_size: int, seq: int) -> float:
    """6 x matmul parameters x tokens, plus causal attention (12 x layers x dim x seq^2 / 2 per row)."""
    text = model.text.config
    text_params = sum(p.numel() for n, p in model.text.named_parameters() if "tok_embeddings" not in n)
    vision_params = sum(p.numel() for p in model.vision.parameters())
    vision_tokens = model.vision.num_tokens + 1
    flops = 6 * text_params * batch_size * seq + 6 * vision_params * batch_size * vision_tokens
    flops += 6 * text.n_layers * text.dim * seq * seq * batch_size  # QK^T and AV, fwd+bwd, causal half
    return float(flops)


def run(recipe: str, args) -> dict:
    torch.manual_seed(0)
    device = "cuda"
    model = build_model(llava_1b()).to(device)
    set_trainable(model, "full")
    if recipe != "bf16":
        from vlm.training.fp8 import convert_to_float8

        convert_to_float8(model, recipe=recipe)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    data = batch(model, args.batch_size, args.seq, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(data, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    flops = train_flops_per_step(model, args.batch_size, args.seq)
    result = {"recipe": recipe, "step_s": seconds, "tokens_per_s": args.batch_size * args.seq / seconds,
              "mfu_vs_bf16_peak": flops / seconds / (H200_BF16_DENSE_TFLOPS * 1e12),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["bf16", "tensorwise", "rowwise", "delayed"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    print(f"{'recipe':<12} {'step s':>8} {'tokens/s':>10} {'MFU*':>6} {'peak GiB':>9} {'speed-up':>9}")
    for recipe in args.recipes:
        r = run(recipe, args)
        torch.cuda.empty_cache()  # the previous model is gone with run()'s frame
        results.append(r)
        speedup = results[0]["step_s"] / r["step_s"]
        print(f"{recipe:<12} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} {r['mfu_vs_bf16_peak']:>6.1%} "
              f"{r['peak_gib']:>9.1f} {speedup:>8.2f}x", flush=True)
    print("* MFU against the dense bf16 peak of an H200 (989 TFLOP/s), for every recipe")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
