"""GPU training throughput and MFU of a LLaVA-style model the size of Llama-3.2-1B + CLIP ViT-L/14
(random weights, nothing downloaded) at sequence 2048: bf16 eager, bf16 compiled (per block, as
`model.compile: true` does), fp8 tensorwise / rowwise / delayed compiled; then the same text model
without images, and `transformers`' Llama of the same size (eager and compiled) as the anchor.
Run by scripts/gpu_check.sh; writes JSON and a markdown table.

    python scripts/gpu_bench.py --json benchmarks/results/gpu.json --markdown benchmarks/results/gpu.md
    python scripts/gpu_bench.py --tiny --device cpu --compile-backend eager --steps 1 --warmup 1   # the code path, on CPU

MFU: model FLOPs (`vlm.flops`: every product, attention over the full square, the head on the
positions the loss needs, 3x forward for a training step) per second over the dense bf16 peak of
the device (H200: 989 TFLOP/s), for every row, fp8 included.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlm.flops import StepShape, model_flops, text_flops
from vlm.fusion import FusionConfig
from vlm.model import ModelInput, VLMConfig, build_model
from vlm.stages import set_trainable
from vlm.text.llama import LlamaConfig
from vlm.text.rope import RopeScaling
from vlm.training.compile import compile_model
from vlm.vision import VisionConfig

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, vendor figures
ROWS = ("bf16-eager", "bf16-compiled", "fp8-tensorwise", "fp8-rowwise", "fp8-delayed",
        "text-compiled", "transformers-eager", "transformers-compiled")
IMAGE_ID = 128256  # Llama 3's vocabulary + <|image|>


def llava_1b(tiny: bool = False) -> VLMConfig:
    """Llama-3.2-1B's shape (tied head, GQA 32/8, llama3 RoPE) + a ViT-L/14 tower at 224 (257 tokens
    with CLS, feature layer -2), mlp2x_gelu projector. `tiny`: the same structure, a few MB."""
    if tiny:
        text = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=128,
                           max_seq_len=256, tie_embeddings=True)
        vision = VisionConfig(model="vit_tiny_patch16_224", frozen=False,
                              model_kwargs=dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2))
    else:
        text = LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=IMAGE_ID + 1, hidden_dim=8192,
                           rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0), max_seq_len=4096,
                           tie_embeddings=True)
        vision = VisionConfig(name="open_clip", model="ViT-L-14", feature_layer=-2, frozen=False)
    return VLMConfig(text=text, vision=vision, fusion=FusionConfig("llava", {"projector": "mlp2x_gelu"}),
                     image_token_id=text.vocab_size - 1)


def make_batch(model, vocab: int, batch_size: int, seq: int, device: str, *, images: bool) -> ModelInput:
    """One image at the start of each row (when `images`), the rest random text; the image span and
    its marker token are not learned."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (batch_size, seq), generator=generator)  # the last id is <|image|>
    labels = ids.clone()
    if not images:
        return ModelInput(ids.to(device), None, None, None, labels.to(device))
    span = model.tokens_per_image
    ids[:, 1 : 1 + span] = vocab - 1
    labels[:, : 1 + span] = -100
    size = model.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    return ModelInput(ids.to(device), None, pixels.to(device), torch.arange(batch_size, device=device), labels.to(device))


def timed(step: Callable[[], torch.Tensor], *, warmup: int, steps: int, device: str) -> tuple[float, float, float]:
    """(seconds per step, first-steps seconds (compilation included), last loss)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    first = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    return (time.perf_counter() - start) / steps, first, float(loss)


def train_step(forward: Callable[[], torch.Tensor], parameters: list[torch.nn.Parameter], device: str) -> Callable[[], torch.Tensor]:
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device == "cuda")

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ours(row: str, args) -> tuple[Callable, float, int]:
    """The train step of row `row` of our model, its FLOPs per step and tokens per step."""
    torch.manual_seed(0)
    with torch.device(args.device):
        model = build_model(llava_1b(args.tiny))
    set_trainable(model, "full")
    if row.startswith("fp8-"):
        from vlm.training.fp8 import convert_to_float8

        convert_to_float8(model, recipe=row.removeprefix("fp8-"))
    images = row != "text-compiled"
    batch = make_batch(model, model.text.config.vocab_size, args.batch_size, args.seq, args.device, images=images)
    shape = StepShape(args.batch_size, args.seq, images=args.batch_size if images else 0, images_per_row=int(images),
                      head_positions=int((batch.labels[:, 1:] != -100).sum()))
    flops = model_flops(model, shape).train  # before compiling: the tower's count runs it under FlopCounterMode
    if row != "bf16-eager":
        compile_model(model, backend=args.compile_backend)
    params = [p for p in model.parameters() if p.requires_grad]
    return train_step(lambda: model(batch, return_logits=False).loss, params, args.device), flops, batch.input_ids.numel()


def transformers_llama(row: str, args) -> tuple[Callable, float, int]:
    """transformers' LlamaForCausalLM of the same text shape, its own loss (full logits)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    c = llava_1b(args.tiny).text
    rope = None if c.rope_scaling is None else {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = HFConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=rope,
                      max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    model.train()
    forward_model = torch.compile(model, backend=args.compile_backend) if row.endswith("compiled") else model
    batch = make_batch(None, c.vocab_size, args.batch_size, args.seq, args.device, images=False)
    flops = 3 * sum(text_flops(c, StepShape(args.batch_size, args.seq, head_positions=args.batch_size * (args.seq - 1))).values())
    forward = lambda: forward_model(input_ids=batch.input_ids, labels=batch.labels).loss  # noqa: E731
    return train_step(forward, list(model.parameters()), args.device), flops, batch.input_ids.numel()


def measure(row: str, args) -> dict:
    build = transformers_llama if row.startswith("transformers") else ours
    step, flops, tokens = build(row, args)
    seconds, first_s, loss = timed(step, warmup=args.warmup, steps=args.steps, device=args.device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return {"row": row, "step_s": seconds, "warmup_s": first_s, "tokens_per_s": tokens / seconds,
            "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / (args.peak_tflops * 1e12),
            "train_flops_per_step": flops, "peak_gib": peak, "loss": loss}


def markdown(results: list[dict], args) -> str:
    lines = [f"Training step, batch {args.batch_size} x {args.seq} tokens, {args.device_name}; MFU over the dense "
             f"bf16 peak ({args.peak_tflops:.0f} TFLOP/s) for every row; {args.steps} timed steps after {args.warmup}.",
             "", "| run | step (s) | tokens/s | TFLOP/s | MFU | peak GiB | first steps (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['row']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops_per_s']:.1f} | "
                     f"{r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['warmup_s']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--tiny", action="store_true", help="a few-MB model of the same structure (checks the code path)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by GPU name (H200/H100 989, A100 312)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq = min(args.seq, 64)
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in args.device_name), 989.0)
    return args


def write(results: list[dict], args) -> None:
    """The JSON and the table so far: rewritten after every row, so a run stopped by its timeout
    keeps the rows it finished."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for path, text in ((args.json, json.dumps({"config": config, "results": results}, indent=2)),
                       (args.markdown, markdown(results, args))):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device (use --device cpu --tiny to check the code path)")
    results = []
    for row in args.rows:
        try:
            results.append(measure(row, args))
        except Exception as error:  # one failed row must not lose the others' numbers
            results.append({"row": row, "error": f"{type(error).__name__}: {error}"})
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(markdown(results[-1:], args).splitlines()[-1], flush=True)
        write(results, args)
    print(markdown(results, args))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
