"""`python scripts/bench.py moe`: our MoE Llama vs `transformers.MixtralForCausalLM` at the same small
config (8 experts, top-2 by default): train step (forward + backward, each library's own loss path)
and greedy generation, interleaved repeats, median tokens/s with the min-max of the runs.

Both sides hold the same weights: transformers' random model is saved and read back with
`vlm.checkpoints.load_llama` (the Mixtral converter under test). The balancing loss is off on both
sides (coefficient 0): transformers pools its layers into one Switch loss, we sum one per layer, so
the losses would differ by that term; the routers still run, and the two losses must agree before
any timing. transformers runs its default experts implementation (named in the JSON).
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, default=None, help="each expert's hidden size (default: the Llama FFN rule)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--gen-prompt", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--target", type=float, default=1.5, help="train tokens/s ratio ours / transformers to meet")


def mixtral_pair(args: argparse.Namespace):
    """transformers' random Mixtral and ours loaded from its saved directory."""
    import transformers
    from bench import ffn_dim

    from vlm.checkpoints import load_llama

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=args.dim, intermediate_size=args.expert_dim or ffn_dim(args.dim), num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, router_aux_loss_coef=0.0,
        max_position_embeddings=4096)
    hf = transformers.MixtralForCausalLM(config)
    hf.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # decisive routing, so that float rounding cannot swap an expert
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_llama(tmp)
    return hf, ours


def spread(times: list[tuple[float, float]], work: float) -> dict:
    """Min and max tokens/s over the timed runs (wall clock)."""
    rates = [work / wall for wall, _ in times]
    return {"min": min(rates), "max": max(rates)}


def run(args: argparse.Namespace) -> dict:
    from bench import compare, train_step

    from vlm.generation import generate
    from vlm.text.moe import pop_aux_loss

    hf, ours = mixtral_pair(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def our_loss() -> torch.Tensor:
        loss = ours.loss(ids, ids)
        aux = pop_aux_loss(ours)  # None: coefficient 0; added as the training module would
        return loss if aux is None else loss + aux

    steps = {"ours": lambda: train_step(ours, our_loss),
             "theirs": lambda: train_step(hf, lambda: hf(input_ids=ids, labels=ids).loss)}
    prompt = torch.randint(0, args.vocab, (args.gen_batch, args.gen_prompt), generator=torch.Generator().manual_seed(2))
    new = args.gen_tokens
    gens = {"ours": lambda: generate(ours, prompt.tolist(), max_new_tokens=new)[0],
            "theirs": lambda: hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                          eos_token_id=None)[0, prompt.shape[1]:].tolist()}
    title = (f"moe: Mixtral-style, dim {args.dim}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
             f"expert dim {ours.config.moe.expert_hidden_dim or ours.config.hidden_dim}, vocab {args.vocab}, "
             f"seq {args.seq}, batch {args.batch}, fp32, {torch.get_num_threads()} threads")
    result = compare(args, (hf, ours), steps=steps, gens=gens, train_tokens=ids.numel(), gen_tokens=args.gen_batch * new,
                     targets=(args.target, None), title=title)
    raw = result["timings"]
    result["spread_tokens_per_s"] = {
        what: {side: spread(raw[what]["runs_wall_cpu_s"][side], work) for side in ("ours", "theirs")}
        for what, work in (("train", ids.numel()), ("generate", args.gen_batch * new))}
    result["transformers_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
    result["ours_dispatch"] = "torch._grouped_mm" if _grouped(ours) else "padded bmm"
    for what, sides in result["spread_tokens_per_s"].items():
        print(f"{what} tokens/s min-max over {args.repeats} runs: vlm {sides['ours']['min']:,.0f}-{sides['ours']['max']:,.0f}, "
              f"transformers {sides['theirs']['min']:,.0f}-{sides['theirs']['max']:,.0f}", flush=True)
    print(f"dispatch: vlm {result['ours_dispatch']}, transformers experts_implementation "
          f"{result['transformers_experts_implementation']}", flush=True)
    return result


def _grouped(model: torch.nn.Module) -> bool:
    from vlm.text.moe import grouped_mm_supported

    weight = model.tok_embeddings.weight
    return grouped_mm_supported(weight.device.type, weight.dtype)
