"""Benchmarks against the anchors, measured in the same run: every row prints a ratio ours / theirs.

    python scripts/bench.py llama            # train step and greedy generation vs transformers
    python scripts/bench.py llama --threads 2 --json benchmarks/results/llama.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _llama_pair(args: argparse.Namespace):
    import transformers

    from vlm.checkpoints import load_llama

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.dim * 8 // 3 // 64 * 64 or 64, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=4096, rope_theta=500000.0,
    )
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_llama(tmp)
    return hf, ours


def bench_llama(args: argparse.Namespace) -> dict:
    from vlm.generation import generate

    hf, ours = _llama_pair(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = ids.clone()

    def train_step(model, loss_fn):
        # Each library's own training loss path: transformers' `labels=` and our fused loss.
        model.zero_grad(set_to_none=True)
        loss_fn().backward()

    hf.train(), ours.train()
    t_hf = timed(lambda: train_step(hf, lambda: hf(input_ids=ids, labels=labels).loss), warmup=2, repeats=args.repeats)
    t_ours = timed(lambda: train_step(ours, lambda: ours.loss(ids, labels)), warmup=2, repeats=args.repeats)
    tokens = args.batch * args.seq

    hf.eval(), ours.eval()
    prompt = torch.randint(0, args.vocab, (args.gen_batch, args.gen_prompt))
    new = args.gen_tokens
    with torch.no_grad():
        g_hf = timed(lambda: hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                         pad_token_id=0, eos_token_id=None), warmup=1, repeats=args.repeats)
        g_ours = timed(lambda: generate(ours, prompt.tolist(), max_new_tokens=new), warmup=1, repeats=args.repeats)
    gen_tokens = args.gen_batch * new
    rows = [
        ("train fwd+bwd tokens/s", tokens / t_ours, tokens / t_hf, 1.2),
        ("greedy generation tokens/s", gen_tokens / g_ours, gen_tokens / g_hf, 2.0),
    ]
    print_table(f"llama: dim {args.dim}, {args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, "
                f"seq {args.seq}, batch {args.batch}, fp32, {torch.get_num_threads()} threads", rows)
    return {"config": {k: v for k, v in vars(args).items() if k != "func"}, "rows": [
        {"metric": m, "ours": o, "transformers": t, "ratio": o / t, "target": tgt} for m, o, t, tgt in rows]}


def print_table(title: str, rows: list[tuple[str, float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"{'metric':<30} {'vlm':>12} {'transformers':>14} {'ratio':>7} {'target':>7}")
    for metric, ours, theirs, target in rows:
        ratio = ours / theirs
        flag = "ok" if ratio >= target else "MISS"
        print(f"{metric:<30} {ours:>12.1f} {theirs:>14.1f} {ratio:>6.2f}x {target:>6.1f}x {flag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    llama = sub.add_parser("llama", help="train step and greedy generation vs transformers.LlamaForCausalLM")
    llama.add_argument("--dim", type=int, default=256)
    llama.add_argument("--layers", type=int, default=4)
    llama.add_argument("--heads", type=int, default=8)
    llama.add_argument("--kv-heads", type=int, default=2)
    llama.add_argument("--vocab", type=int, default=32000)
    llama.add_argument("--seq", type=int, default=256)
    llama.add_argument("--batch", type=int, default=8)
    llama.add_argument("--gen-batch", type=int, default=1)
    llama.add_argument("--gen-prompt", type=int, default=32)
    llama.add_argument("--gen-tokens", type=int, default=64)
    llama.set_defaults(func=bench_llama)
    for p in (llama,):
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = args.func(args)
    result["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor()
                         or platform.machine(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
