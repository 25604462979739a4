"""Benchmarks against the anchors, measured in the same run: every row prints a ratio ours / theirs.

    python scripts/bench.py llama       # Llama train step and greedy generation vs transformers.LlamaForCausalLM
    python scripts/bench.py llava       # LLaVA train step and generation vs transformers.LlavaForConditionalGeneration
    python scripts/bench.py flamingo    # deep fusion vs transformers' Idefics v1 (IdeficsForVisionText2Text)
    python scripts/bench.py fusion      # LLaVA vs Flamingo: same backbone, shapes data and steps
    python scripts/bench.py features    # emoji recipe train step: cached tower features vs the frozen tower
    python scripts/bench.py lora        # full fine-tuning vs LoRA vs QLoRA: peak memory, step time (scripts/bench_lora.py)
    python scripts/bench.py moe         # MoE Llama train step and generation vs transformers.MixtralForCausalLM (scripts/bench_moe.py)
    python scripts/bench.py all         # every benchmark at its defaults (lora and moe excepted: minutes on their own)
    python scripts/bench.py llama --threads 2 --json benchmarks/results/llama.json
    python scripts/bench.py llava --profile --compile   # + side-by-side torch.profiler tables, torch.compile
    python scripts/bench.py flamingo --compile-only      # eager vs per-block and whole-step torch.compile only

Each benchmark writes benchmarks/results/<name>.json (`--out-dir` elsewhere, `--json` for one
file). Timings interleave the two sides: every repetition runs one of each, the order flipping
each time, and the median is reported, so load from other processes hits both sides alike; the
median process CPU time gives a second ratio that other processes' load barely moves. Both sides
get the same weights wherever their architectures allow, and the benchmark checks that they
compute the same loss and the same greedy tokens before it reports a ratio.

One thread by default (`--threads`): on a 2-core machine that other jobs share, two OpenMP threads
wait on each other at every op and run 2-4x slower than one, which would measure the neighbours.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BOS, IMAGE = 1, 5  # token ids of the synthetic prompts (<|image|> is 5 in a vlm-trained tokenizer)


# --- timing, tables, profiles ------------------------------------------------------------------

class Timings(dict):
    """name -> median wall seconds; `.cpu` holds the median process CPU seconds, `.raw` every run."""

    def __init__(self, times: dict[str, list[tuple[float, float]]]) -> None:
        super().__init__({name: statistics.median(w for w, _ in runs) for name, runs in times.items()})
        self.cpu = {name: statistics.median(c for _, c in runs) for name, runs in times.items()}
        self.raw = times


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> Timings:
    """Median seconds of each function; one run of each per repetition, order flipped every time."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for rep in range(repeats):
        order = list(fns.items()) if rep % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return Timings(times)


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """zero_grad, forward with the library's own loss path, backward (no optimizer: both sides alike)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach()


Row = tuple  # (metric, ours, theirs, target or None, CPU-time ratio or None)


def throughput_row(metric: str, work: float, t: Timings, target: float | None) -> Row:
    """`work` units per second on each side; the CPU-time ratio is theirs' CPU time over ours."""
    return (metric, work / t["ours"], work / t["theirs"], target, t.cpu["theirs"] / t.cpu["ours"])


def print_table(title: str, rows: list[Row], *, ours: str = "vlm", theirs: str = "transformers") -> None:
    print(f"\n{title}")
    print(f"{'metric':<34} {ours:>12} {theirs:>14} {'ratio':>7} {'target':>7}       {'cpu-time ratio':>14}")
    for metric, a, b, target, cpu in rows:
        ratio = f"{a / b:>6.2f}x" if b else "      -"
        flag = "    " if target is None else ("ok  " if a >= target * b else "MISS")
        shown = "-" if target is None else f"{target:.1f}x"
        cpu_shown = "" if cpu is None else f"{cpu:.2f}x"
        print(f"{metric:<34} {_num(a):>12} {_num(b):>14} {ratio} {shown:>7} {flag} {cpu_shown:>14}", flush=True)


def _num(x: float) -> str:
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3f}"


def rows_json(rows: list[Row], theirs: str = "transformers") -> list[dict]:
    return [{"metric": m, "ours": o, theirs: t, "ratio": o / t if t else None, "target": tgt, "cpu_time_ratio": cpu}
            for m, o, t, tgt, cpu in rows]


def timings_json(**timings: Timings) -> dict:
    return {name: {"median_s": dict(t), "median_cpu_s": t.cpu, "runs_wall_cpu_s": t.raw} for name, t in timings.items()}


def check_close(what: str, ours: float, theirs: float, *, tol: float = 1e-3) -> None:
    """The two sides must compute the same thing, or the ratio compares different work."""
    if abs(ours - theirs) > tol * max(1.0, abs(theirs)):
        raise RuntimeError(f"{what}: ours {ours:.6f} vs transformers {theirs:.6f}; the models are not equivalent")


def same_tokens(ours: list[int], theirs: list[int]) -> bool:
    if ours != theirs:
        print(f"warning: greedy tokens differ (ours {ours[:8]}..., transformers {theirs[:8]}...)", flush=True)
    return ours == theirs


def profile_pair(fns: dict[str, Callable[[], object]], *, what: str, repeats: int = 3, top: int = 14) -> dict:
    """Self CPU time per op, the minimum over `repeats` interleaved profiled runs of each side
    (the minimum filters out time lost to other processes); printed side by side."""
    from torch.profiler import ProfilerActivity, profile

    best: dict[str, dict[str, tuple[float, int]]] = {name: {} for name in fns}
    for rep in range(repeats):
        for name, fn in (list(fns.items()) if rep % 2 == 0 else list(reversed(fns.items()))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                old = best[name].get(e.key, (float("inf"), 0))
                best[name][e.key] = (min(old[0], e.self_cpu_time_total / 1e3), e.count)
    totals = {name: sum(ms for ms, _ in ops.values()) for name, ops in best.items()}
    ops = sorted(set().union(*best.values()), key=lambda o: -sum(best[n].get(o, (0, 0))[0] for n in fns))[:top]
    print(f"\nprofile ({what}): self CPU ms per op, min of {repeats} runs; total ours {totals['ours']:.0f} ms, "
          f"theirs {totals['theirs']:.0f} ms")
    print(f"  {'op':<58} {'ours':>9} {'calls':>6} {'theirs':>9} {'calls':>6}")
    for op in ops:
        (a, na), (b, nb) = best["ours"].get(op, (0, 0)), best["theirs"].get(op, (0, 0))
        print(f"  {op[:58]:<58} {a:>9.1f} {na:>6} {b:>9.1f} {nb:>6}")
    return {"totals_ms": totals, "ops": [{"op": op, **{f"{n}_ms": best[n].get(op, (0, 0))[0] for n in fns},
                                           **{f"{n}_calls": best[n].get(op, (0, 0))[1] for n in fns}} for op in ops]}


def compile_comparison(model: torch.nn.Module, make_loss: Callable[[torch.nn.Module], Callable[[], torch.Tensor]], *,
                       repeats: int, backend: str = "inductor", modes: tuple[str, ...] = ("regional", "whole")) -> dict:
    """Our train step eager vs compiled: `regional` compiles each block as `model.compile: true`
    does (vlm.training.compile), `whole` compiles the step's forward and loss as one graph. For each:
    compile time (the first two calls, with a fresh inductor cache), graphs and recompiles (of those
    two calls: the first builds RoPE tables, which the second call's guards see), then
    all sides interleaved `repeats` times: median, min and max seconds."""
    import copy

    from vlm.training.compile import compile_blocks, compile_statistics

    steps = {"eager": lambda: train_step(model, make_loss(model))}
    result: dict = {"backend": backend}
    torch._dynamo.reset()  # once: a reset between the modes would drop the first mode's graphs
    for mode in modes:
        if mode == "regional":
            copied = copy.deepcopy(model)
            units = _blocks_of(copied)
            compile_blocks(units, backend=backend)
            step = (lambda m: lambda: train_step(m, make_loss(m)))(copied)
        else:
            forward = torch.compile(make_loss(model), backend=backend)
            step = (lambda f: lambda: train_step(model, f))(forward)
        before = compile_statistics()
        with tempfile.TemporaryDirectory() as cache:  # a first run's compile time, not a cache hit
            old, os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), cache
            try:
                start = time.perf_counter()
                step(), step()  # the second call may recompile once for what it saw
                compile_s = time.perf_counter() - start
            finally:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR") if old is None else os.environ.update(TORCHINDUCTOR_CACHE_DIR=old)
        after = compile_statistics()
        result[mode] = {"compile_s": compile_s, "graphs": int(after["compile/graphs"] - before["compile/graphs"]),
                        "recompiles": int(after["compile/recompiles"] - before["compile/recompiles"])}
        steps[mode] = step
    t = interleaved(steps, warmup=0, repeats=repeats)
    for name in steps:
        walls = [w for w, _ in t.raw[name]]
        result.setdefault(name, {}).update(median_s=t[name], min_s=min(walls), max_s=max(walls), cpu_median_s=t.cpu[name])
    print(f"\ntorch.compile of our train step ({backend}, {repeats} interleaved repeats; median [min-max] ms):")
    print(f"  eager     {_spread(result['eager'])}")
    for mode in modes:
        r = result[mode]
        r["speedup"] = t["eager"] / t[mode]
        r["speedup_worst"] = min(w for w, _ in t.raw["eager"]) / r["max_s"]  # slowest compiled vs fastest eager
        print(f"  {mode:<9} {_spread(r)}  speed-up {r['speedup']:.2f}x (worst pair {r['speedup_worst']:.2f}x), "
              f"compile {r['compile_s']:.1f} s, {r['graphs']} graphs, {r['recompiles']} recompiles", flush=True)
    return result


def _spread(r: dict) -> str:
    return f"{r['median_s'] * 1e3:7.0f} [{r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f}]"


def _blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The regional-compile units: a VisionLanguageModel's blocks, or a Llama's decoder layers."""
    if hasattr(model, "fusion"):
        from vlm.training.parallel import blocks

        return blocks(model)
    return list(model.layers)


def compare(args: argparse.Namespace, models: tuple, *, steps: dict, gens: dict, train_tokens: int, gen_tokens: int,
            targets: tuple, title: str, theirs: str = "transformers",
            make_loss: Callable[[torch.nn.Module], Callable[[], torch.Tensor]] | None = None) -> dict:
    """The common part of llama, llava and flamingo: check equality, time train and generation, report.
    `make_loss(model)`: our loss closure, for `--compile` (`--compile-only` skips the rest)."""
    if getattr(args, "compile_only", False):
        return {"title": title, "config": config_json(args),
                "compile": compile_comparison(models[1].train(), make_loss, repeats=args.repeats,
                                              backend=args.compile_backend, modes=tuple(args.compile_modes))}
    for m in models:
        m.train()
    check_close(f"{args.bench} train loss", float(steps["ours"]()), float(steps["theirs"]()))
    t = interleaved(steps, warmup=1, repeats=args.repeats)
    for m in models:
        m.eval()
    match = same_tokens(gens["ours"](), gens["theirs"]())
    g = interleaved(gens, warmup=0, repeats=args.repeats)
    rows = [throughput_row("train fwd+bwd tokens/s", train_tokens, t, targets[0]),
            throughput_row("greedy generation tokens/s", gen_tokens, g, targets[1])]
    print_table(title, rows, theirs=theirs)
    result = {"title": title, "config": config_json(args), "rows": rows_json(rows, theirs),
              "checks": {"train_loss_equal": True, "greedy_tokens_equal": match}, "timings": timings_json(train=t, generate=g)}
    if args.profile:
        result["profile"] = {"generate": profile_pair(gens, what="greedy generation")}
    for m in models:
        m.train()
    saved = result["saved_for_backward_mb"] = {name: saved_for_backward(model, steps[name])
                                               for name, model in zip(("theirs", "ours"), models)}
    print(f"activations saved for backward in one train step: vlm {saved['ours']:.1f} MB, {theirs} {saved['theirs']:.1f} MB "
          f"({saved['theirs'] / saved['ours']:.2f}x less)", flush=True)
    if args.profile:
        result["profile"]["train"] = profile_pair(steps, what="train step")
    if make_loss is not None and getattr(args, "compile", False):
        result["compile"] = compile_comparison(models[1], make_loss, repeats=args.repeats, backend=args.compile_backend,
                                               modes=tuple(args.compile_modes))
    return result


def saved_for_backward(model: torch.nn.Module, step: Callable[[], object]) -> float:
    """MB that autograd keeps for backward during one train step (the activation memory; weights excluded)."""
    saved = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        step()
    return saved.total / 2**20


def config_json(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "json", "out_dir")}


def machine_info() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_average_1_5_15": os.getloadavg()}


# --- weights across libraries ------------------------------------------------------------------

def copy_llama_from_hf(ours: torch.nn.Module, hf_state: dict[str, torch.Tensor], *, prefix: str = "model.") -> None:
    """Load the text part of a transformers state dict (`{prefix}layers.0...`, `lm_head.weight`) into our Llama."""
    from vlm.checkpoints import hf_to_ours

    state = {"output.weight": hf_state["lm_head.weight"]}
    for name, tensor in hf_state.items():
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        if rest.startswith(("embed_tokens.", "layers.", "norm.")):  # not the vision or fusion parts
            state[hf_to_ours("model." + rest)] = tensor
    ours.load_state_dict(state, strict=True)


def copy_clip_vision_from_hf(visual: torch.nn.Module, hf_state: dict[str, torch.Tensor]) -> None:
    """A transformers CLIP-layout vision tower -> an open_clip VisionTransformer (pruned after some block).

    q/k/v projections become open_clip's packed `in_proj`; blocks the pruned tower lacks are skipped."""
    state = {"class_embedding": hf_state["embeddings.class_embedding"],
             "conv1.weight": hf_state["embeddings.patch_embedding.weight"],
             "positional_embedding": hf_state["embeddings.position_embedding.weight"],
             "ln_pre.weight": hf_state["pre_layrnorm.weight"], "ln_pre.bias": hf_state["pre_layrnorm.bias"]}
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(len(visual.transformer.resblocks)):
        ours, theirs = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for a, b in renames.items():
                state[f"{ours}{a}.{kind}"] = hf_state[f"{theirs}{b}.{kind}"]
            state[f"{ours}attn.in_proj_{kind}"] = torch.cat([hf_state[f"{theirs}self_attn.{p}_proj.{kind}"] for p in "qkv"])
    visual.load_state_dict(state, strict=True)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def open_clip_vision(args: argparse.Namespace, *, feature_layer: int, keep_prefix_tokens: bool, quick_gelu: bool):
    """Our open_clip ViT tower (frozen) with the size of a transformers CLIP tower of the same args."""
    from vlm.vision import VisionConfig

    vision_cfg = {"image_size": args.image_size, "patch_size": args.patch, "width": args.vision_width,
                  "layers": args.vision_layers, "head_width": args.vision_width // args.vision_heads, "mlp_ratio": 4.0}
    return VisionConfig(name="open_clip", model="ViT-B-32", feature_layer=feature_layer, keep_prefix_tokens=keep_prefix_tokens,
                        frozen=True,
                        model_kwargs={"embed_dim": args.vision_width, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg})


def ffn_dim(dim: int) -> int:
    return dim * 8 // 3 // 64 * 64 or 64


def random_text(batch: int, length: int, vocab: int, *, seed: int = 0) -> torch.Tensor:
    """Token ids that are never BOS or <|image|> (ids below 10 are left to special tokens)."""
    return torch.randint(10, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def image_rows(batch: int, image_tokens: int, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS, <|image|> x image_tokens, text...] per row, and labels that learn only the text."""
    head = torch.tensor([BOS] + [IMAGE] * image_tokens).expand(batch, -1)
    return torch.cat([head, text], 1), torch.cat([torch.full_like(head, -100), text], 1)


# --- llama -------------------------------------------------------------------------------------

def _llama_pair(args: argparse.Namespace):
    import transformers

    from vlm.checkpoints import load_llama

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        hidden_size=args.dim, intermediate_size=ffn_dim(args.dim), num_hidden_layers=args.layers,
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
    # Each library's own training loss path: transformers' `labels=` and our fused loss.
    steps = {"ours": lambda: train_step(ours, lambda: ours.loss(ids, labels)),
             "theirs": lambda: train_step(hf, lambda: hf(input_ids=ids, labels=labels).loss)}
    prompt = torch.randint(0, args.vocab, (args.gen_batch, args.gen_prompt))
    new = args.gen_tokens
    gens = {"ours": lambda: generate(ours, prompt.tolist(), max_new_tokens=new)[0],
            "theirs": lambda: hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                          eos_token_id=None)[0, prompt.shape[1]:].tolist()}
    return compare(args, (hf, ours), steps=steps, gens=gens, train_tokens=ids.numel(), gen_tokens=args.gen_batch * new,
                   make_loss=lambda m: lambda: m.loss(ids, labels),
                   targets=(1.2, 2.0), title=f"llama: dim {args.dim}, {args.layers} layers, {args.heads} heads, {args.kv_heads} "
                   f"kv heads, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, fp32, {torch.get_num_threads()} threads")


# --- llava -------------------------------------------------------------------------------------

def _llava_pair(args: argparse.Namespace):
    """transformers LLaVA (CLIP tower, layer -2, CLS dropped) and ours with all its weights copied."""
    import transformers

    from vlm.fusion import FusionConfig
    from vlm.model import VLMConfig, build_model
    from vlm.stages import set_trainable
    from vlm.text.llama import LlamaConfig

    torch.manual_seed(0)
    grid = args.image_size // args.patch
    text = transformers.LlamaConfig(hidden_size=args.dim, intermediate_size=ffn_dim(args.dim), num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                    max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5)
    vision = transformers.CLIPVisionConfig(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
                                           num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads,
                                           image_size=args.image_size, patch_size=args.patch, hidden_act="quick_gelu")
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default", image_seq_length=grid * grid,
                                      projector_hidden_act="gelu")
    hf = transformers.LlavaForConditionalGeneration(config)
    hf.model.vision_tower.requires_grad_(False)  # LLaVA's instruct stage: projector + LLM train
    ours = build_model(VLMConfig(
        text=LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                         vocab_size=args.vocab, hidden_dim=ffn_dim(args.dim), norm_eps=1e-5, rope_theta=10000.0),
        vision=open_clip_vision(args, feature_layer=-2, keep_prefix_tokens=False, quick_gelu=True),
        fusion=FusionConfig("llava", {"projector": "mlp2x_gelu"}), image_token_id=IMAGE))
    set_trainable(ours, "instruct")
    copy_llama_from_hf(ours.text, state_of(hf), prefix="model.language_model.")
    copy_clip_vision_from_hf(ours.vision.visual, state_of(hf.model.vision_tower))
    projector = hf.model.multi_modal_projector
    ours.fusion.projector.load_state_dict({"0.weight": projector.linear_1.weight, "0.bias": projector.linear_1.bias,
                                           "2.weight": projector.linear_2.weight, "2.bias": projector.linear_2.bias})
    return hf, ours


def bench_llava(args: argparse.Namespace) -> dict:
    from vlm.model import ModelInput

    hf, ours = _llava_pair(args)
    per_image = ours.tokens_per_image
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    ids, labels = image_rows(args.batch, per_image, random_text(args.batch, args.text_tokens, args.vocab))
    mask = torch.ones_like(ids)
    batch = ModelInput(ids, mask, pixels, torch.arange(args.batch), labels)
    steps = {"ours": lambda: train_step(ours, lambda: ours(batch, return_logits=False).loss),
             "theirs": lambda: train_step(hf, lambda: hf(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                                         labels=labels).loss)}
    text = random_text(1, args.gen_prompt, args.vocab, seed=2)
    prompt = [BOS, IMAGE] + text[0].tolist()  # ours expands the one <|image|> itself
    expanded, _ = image_rows(1, per_image, text)  # transformers wants it expanded
    new = args.gen_tokens
    gens = {"ours": lambda: ours.generate([[pixels[0]]], [prompt], max_new_tokens=new)[0],
            "theirs": lambda: hf.generate(input_ids=expanded, attention_mask=torch.ones_like(expanded), pixel_values=pixels[:1],
                                          max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                          eos_token_id=None)[0, expanded.shape[1]:].tolist()}
    title = (f"llava: Llama dim {args.dim} x {args.layers} layers ({args.heads} heads, {args.kv_heads} kv), vocab {args.vocab}; "
             f"CLIP ViT width {args.vision_width} x {args.vision_layers}, {args.image_size}px/{args.patch} -> {per_image} image "
             f"tokens (layer -2, CLS dropped), projector mlp2x_gelu; batch {args.batch} x seq {ids.shape[1]}; projector + LLM "
             f"train, vision frozen; fp32, {torch.get_num_threads()} threads")
    return compare(args, (hf, ours), steps=steps, gens=gens, train_tokens=ids.numel(), gen_tokens=new, targets=(1.2, None),
                   title=title, make_loss=lambda m: lambda: m(batch, return_logits=False).loss)


# --- flamingo ----------------------------------------------------------------------------------

def _flamingo_pair(args: argparse.Namespace):
    """transformers Idefics v1 and our deep fusion at the same size; text and vision weights copied.

    The fusion blocks differ in design (Idefics: RMSNorm + SwiGLU cross blocks and a ReLU perceiver
    MLP; ours: LayerNorm + GELU, as in Flamingo), so only their sizes match. The gates start at 0
    on both sides, so the two models compute the same function, which the benchmark checks."""
    import transformers

    from vlm.fusion import FusionConfig
    from vlm.model import VLMConfig, build_model
    from vlm.stages import set_trainable
    from vlm.text.llama import LlamaConfig

    torch.manual_seed(0)
    resampler_head_dim = args.vision_width // args.heads
    config = transformers.IdeficsConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=ffn_dim(args.dim), num_hidden_layers=args.layers,
        num_attention_heads=args.heads, rms_norm_eps=1e-5, max_position_embeddings=4096, cross_layer_interval=args.cross_every,
        use_resampler=True, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
        vision_config=dict(embed_dim=args.vision_width, image_size=args.image_size, intermediate_size=4 * args.vision_width,
                           patch_size=args.patch, num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=args.latents, resampler_depth=args.resampler_depth,
                              resampler_n_heads=args.heads, resampler_head_dim=resampler_head_dim))
    hf = transformers.IdeficsForVisionText2Text(config)
    for name, p in hf.named_parameters():  # Flamingo trains the resampler and the cross-attention only
        p.requires_grad_("perceiver_resampler" in name or "gated_cross_attn" in name)
    options = dict(cross_attn_every=args.cross_every, num_latents=args.latents, resampler_depth=args.resampler_depth,
                   resampler_heads=args.heads, resampler_head_dim=resampler_head_dim, cross_attn_heads=args.heads,
                   cross_attn_head_dim=args.dim // args.heads, ff_mult=4, only_attend_immediate=True)
    ours = build_model(VLMConfig(
        text=LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                         vocab_size=args.vocab, hidden_dim=ffn_dim(args.dim), norm_eps=1e-5, rope_theta=10000.0),
        vision=open_clip_vision(args, feature_layer=-1, keep_prefix_tokens=True, quick_gelu=False),
        fusion=FusionConfig("flamingo", options), image_token_id=IMAGE))
    set_trainable(ours, "align")
    copy_llama_from_hf(ours.text, state_of(hf), prefix="model.")
    copy_clip_vision_from_hf(ours.vision.visual, state_of(hf.model.vision_model))
    return hf, ours


def sees_image(ids: torch.Tensor) -> torch.Tensor:
    """Idefics' image_attention_mask [B, T, images]: every token from the image (position 1) on sees it."""
    return (torch.arange(ids.shape[1]) >= 1).long()[None, :, None].expand(ids.shape[0], -1, 1)


def bench_flamingo(args: argparse.Namespace) -> dict:
    from vlm.model import ModelInput

    hf, ours = _flamingo_pair(args)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    ids, labels = image_rows(args.batch, 1, random_text(args.batch, args.text_tokens, args.vocab))
    mask = torch.ones_like(ids)
    batch = ModelInput(ids, mask, pixels, torch.arange(args.batch), labels)
    steps = {"ours": lambda: train_step(ours, lambda: ours(batch, return_logits=False).loss),
             "theirs": lambda: train_step(hf, lambda: hf(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, None],
                                                         image_attention_mask=sees_image(ids), labels=labels).loss)}
    prompt, _ = image_rows(1, 1, random_text(1, args.gen_prompt, args.vocab, seed=2))
    new = args.gen_tokens
    gens = {"ours": lambda: ours.generate([[pixels[0]]], prompt.tolist(), max_new_tokens=new)[0],
            "theirs": lambda: hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels[:1, None],
                                          image_attention_mask=sees_image(prompt), max_new_tokens=new, min_new_tokens=new,
                                          do_sample=False, pad_token_id=0, eos_token_id=None)[0, prompt.shape[1]:].tolist()}
    title = (f"flamingo: Llama dim {args.dim} x {args.layers} layers ({args.heads} heads, MHA), vocab {args.vocab}; "
             f"ViT width {args.vision_width} x {args.vision_layers}, {args.image_size}px/{args.patch} (all tokens); "
             f"resampler {args.latents} latents x {args.resampler_depth}; cross-attention before every {args.cross_every}. "
             f"layer; batch {args.batch} x seq {ids.shape[1]}; resampler + cross-attention train; fp32, "
             f"{torch.get_num_threads()} threads")
    return compare(args, (hf, ours), steps=steps, gens=gens, train_tokens=ids.numel(), gen_tokens=new, targets=(1.2, None),
                   title=title, theirs="idefics", make_loss=lambda m: lambda: m(batch, return_logits=False).loss)


# --- fusion: LLaVA vs Flamingo on the shapes data ----------------------------------------------

def load_yaml(relative: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / relative).read_text())


def fusion_configs(args: argparse.Namespace, recipe: dict) -> dict:
    """VLMConfigs of the shapes recipe (configs/shapes.yaml) with each fusion recipe; CLI overrides shrink them."""
    from vlm.model import VLMConfig

    base = recipe["model"]["config"]
    text = dict(base["text"])
    if args.dim is not None:
        text.update(dim=args.dim, hidden_dim=2 * args.dim)
    if args.layers is not None:
        text["n_layers"] = args.layers
    vision = base["vision"]
    configs = {}
    for name in ("llava", "flamingo"):
        fusion = load_yaml(f"configs/fusion/{name}.yaml")["model"]["config"]["fusion"]
        configs[name] = VLMConfig.from_dict({**base, "text": text, "vision": vision, "fusion": fusion})
    return configs


def shapes_examples(split: str, count: int, *, seed: int) -> list[tuple[object, str]]:
    """(PIL image, caption) pairs: sample i of the caption variant, as `vlm data shapes` writes it."""
    from PIL import Image

    from vlm.data.shapes import make_sample

    out = []
    for i in range(count):
        sample = make_sample("caption", seed=seed, split=split, index=i)
        out.append((Image.open(io.BytesIO(sample["png"])).convert("RGB"), sample["txt"]))
    return out


def train_shapes_tokenizer(captions: list[str], vocab_size: int):
    from vlm.text.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(captions) + "\n")
        return Tokenizer.train([corpus], vocab_size, show_progress=False)


class SavedBytes:
    """Bytes autograd keeps for backward during one forward (storages counted once, parameters excluded)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def memory_estimate(model: torch.nn.Module, saved: int) -> dict[str, float]:
    """Peak training memory in MB: weights + grads + AdamW's two moments + activations saved for backward."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    mb = 2**20
    return {"weights_mb": weights / mb, "grads_mb": trained / mb, "adam_mb": 2 * trained / mb, "activations_mb": saved / mb,
            "peak_mb": (weights + 3 * trained + saved) / mb}


class FusionRun:
    """One model, its optimizer and collator, trained step by step on shared batches."""

    def __init__(self, name: str, config, *, steps: int, optim: dict, tokenizer, seed: int = 0) -> None:
        from vlm.data.collate import Collator
        from vlm.model import build_model
        from vlm.stages import set_trainable
        from vlm.training.optim import OptimConfig, build_optimizer

        torch.manual_seed(seed)  # same seed: both fusions start from the same text and vision weights
        self.name, self.model = name, build_model(config)
        self.table = set_trainable(self.model, "full")
        optim = OptimConfig(**{**optim, "warmup_steps": min(optim.get("warmup_steps", 0), steps // 5)})
        self.optimizer, self.scheduler = build_optimizer(self.model, optim, steps)
        self.collate = Collator(pad_id=tokenizer.pad_id, image_id=tokenizer.image_id, image_token_count=self.model.tokens_per_image)
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.counts: list[tuple[int, int, int]] = []  # per step: samples, text tokens, LM positions
        self.memory: dict[str, float] = {}

    def step(self, encoded: list, *, measure_memory: bool = False) -> None:
        batch = self.collate(encoded)
        self.model.train()
        start = time.perf_counter()
        saved = SavedBytes(self.model)
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
        with hooks if measure_memory else contextlib.nullcontext():
            loss = self.model(batch, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # the recipe's gradient_clip_val
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_times.append(time.perf_counter() - start)
        self.losses.append(loss.item())
        if measure_memory:
            self.memory = memory_estimate(self.model, saved.total)
        real = batch.attention_mask.bool()
        text = real & (batch.input_ids != self.collate.image_id)
        self.counts.append((batch.input_ids.shape[0], int(text.sum()), int(real.sum())))

    def throughput(self, which: int, *, skip: int = 2) -> float:
        """Steady-state units per second (samples 0, text tokens 1, positions 2): the first `skip`
        steps (allocator and cache warm-up, the memory-measured step) are left out."""
        skip = min(skip, len(self.step_times) - 1)
        return sum(c[which] for c in self.counts[skip:]) / sum(self.step_times[skip:])


def bench_fusion(args: argparse.Namespace) -> dict:
    from vlm.caption import Captioner
    from vlm.data.formats import encode_sample
    from vlm.eval.metrics import caption_metrics
    from vlm.text.chat import ChatTemplate

    recipe = load_yaml("configs/shapes.yaml")
    configs = fusion_configs(args, recipe)
    train = shapes_examples("train", args.steps * args.batch, seed=args.seed)
    held_out = shapes_examples("val", args.eval_images, seed=args.seed)
    tokenizer = train_shapes_tokenizer([c for _, c in train], recipe["data"]["tokenizer_vocab_size"])
    template = ChatTemplate(tokenizer)
    runs = {name: FusionRun(name, config, steps=args.steps, optim=recipe["model"]["optim"], tokenizer=tokenizer, seed=args.seed)
            for name, config in configs.items()}
    transform = runs["llava"].model.vision.transform  # the same tower config, so the same transform
    encoded = [encode_sample({"__key__": f"train_{i:08d}", "png": image, "txt": text}, template, transform=transform)
               for i, (image, text) in enumerate(train)]
    start = time.perf_counter()
    for step in range(args.steps):
        chunk = encoded[step * args.batch:(step + 1) * args.batch]
        order = list(runs.values()) if step % 2 == 0 else list(reversed(runs.values()))
        for run in order:  # interleaved, so both see the same machine load
            run.step(chunk, measure_memory=step == min(1, args.steps - 1))
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"fusion step {step + 1}/{args.steps}: " + ", ".join(f"{n} loss {r.losses[-1]:.3f}" for n, r in runs.items()),
                  flush=True)
    train_s = time.perf_counter() - start
    metrics = {}
    for name, run in runs.items():
        captioner = Captioner(run.model, tokenizer)
        begin = time.perf_counter()
        captions = captioner.caption([image for image, _ in held_out], max_new_tokens=recipe["model"]["max_new_tokens"],
                                     batch_size=args.batch)
        metrics[name] = {**caption_metrics(captions, [[text] for _, text in held_out]),
                         "caption_s": time.perf_counter() - begin,
                         "examples": list(zip(captions[:3], [t for _, t in held_out[:3]]))}
    plot = plot_losses(runs, args.out_dir / "fusion_loss.png")
    return fusion_report(args, runs, metrics, train_s=train_s, plot=plot)


def fusion_report(args: argparse.Namespace, runs: dict, metrics: dict, *, train_s: float, plot: Path) -> dict:
    llava, flamingo = runs["llava"], runs["flamingo"]

    def pair(metric: str, value: Callable) -> Row:
        return (metric, value(llava), value(flamingo), None, None)

    rows = [pair("train samples/s", lambda r: r.throughput(0)),
            pair("train text tokens/s", lambda r: r.throughput(1)),
            pair("train LM positions/s", lambda r: r.throughput(2)),
            pair("LM positions per sample", lambda r: sum(c[2] for c in r.counts) / sum(c[0] for c in r.counts)),
            pair("peak train memory MB (estimate)", lambda r: r.memory["peak_mb"]),
            pair("  activations saved for bwd MB", lambda r: r.memory["activations_mb"]),
            pair("parameters trained (M)", lambda r: r.table.trainable / 1e6),
            pair("final loss (mean of last 10%)", lambda r: _tail_mean(r.losses)),
            pair("held-out captions/s (greedy)", lambda r: args.eval_images / metrics[r.name]["caption_s"]),
            pair("held-out exact match %", lambda r: 100 * metrics[r.name]["exact_match"]),
            pair("held-out CIDEr-D x100", lambda r: 100 * metrics[r.name]["cider_d"]),
            pair("held-out BLEU-4 x100", lambda r: 100 * metrics[r.name]["bleu4"])]
    print_table(f"fusion: LLaVA vs Flamingo on shapes captions, {args.steps} steps x batch {args.batch}, same backbone, "
                f"data and order; {args.eval_images} held-out images; stage full; {torch.get_num_threads()} threads",
                rows, ours="llava", theirs="flamingo")
    for name in runs:
        print(f"{name} samples: " + "; ".join(f"{c!r} (ref {r!r})" for c, r in metrics[name]["examples"][:2]))
    print(f"loss curves: {plot}; training both took {train_s:.0f} s")
    return {"config": config_json(args), "models": {n: r.model.config.to_dict() for n, r in runs.items()},
            "rows": [{"metric": m, "llava": a, "flamingo": b} for m, a, b, _, _ in rows],
            "metrics": metrics, "memory": {n: r.memory for n, r in runs.items()},
            "parameters": {n: {part: {"trainable": t, "frozen": f} for part, (t, f) in r.table.rows.items()}
                           for n, r in runs.items()},
            "losses": {n: r.losses for n, r in runs.items()}, "train_s": train_s,
            "plot": str(plot.relative_to(ROOT) if plot.is_relative_to(ROOT) else plot)}


def _tail_mean(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


def plot_losses(runs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, run in runs.items():
        ax.plot(range(1, len(run.losses) + 1), run.losses, label=f"{name} ({run.table.trainable / 1e6:.2f} M trained)")
    ax.set(xlabel="step", ylabel="train loss (next-token cross-entropy)", yscale="log",
           title="LLaVA vs Flamingo: same backbone, data and steps (shapes captions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path




# --- features: a train step from cached tower outputs vs running the frozen tower ----------------

def bench_features(args: argparse.Namespace) -> dict:
    """One optimizer step of configs/emoji.yaml (frozen 224 px EfficientNet-Lite0, stage instruct),
    from cached features ("ours") vs running the frozen tower on pixels ("theirs"), per fusion.
    The two must give the same loss (1e-6) on the same batch before a ratio is reported."""
    from vlm.model import ModelInput, VLMConfig, build_model
    from vlm.stages import set_trainable

    recipe = load_yaml("configs/emoji.yaml")
    base = recipe["model"]["config"]
    vision = {**base["vision"], "checkpoint_path": None, "image_size": args.image_size}  # timing needs no weights
    rows, timings, worst = [], {}, {}
    for name in ("llava", "flamingo"):
        fusion = load_yaml(f"configs/fusion/{name}.yaml")["model"]["config"]["fusion"]
        torch.manual_seed(args.seed)
        model = build_model(VLMConfig.from_dict({**base, "vision": vision, "fusion": fusion}))
        set_trainable(model, recipe["model"]["stage"])
        model.train()
        generator = torch.Generator().manual_seed(args.seed)
        pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
        per_image = model.tokens_per_image
        ids = torch.randint(10, base["text"]["vocab_size"], (args.batch, 1 + per_image + args.text_tokens), generator=generator)
        ids[:, 1:1 + per_image] = base["image_token_id"]
        labels = ids.clone()
        labels[:, :1 + per_image] = -100
        owners = torch.arange(args.batch)
        with torch.no_grad():
            features = model.vision(pixels)
        batches = {"ours": ModelInput(ids, torch.ones_like(ids), None, owners, labels, image_features=features),
                    "theirs": ModelInput(ids, torch.ones_like(ids), pixels, owners, labels)}
        losses = {}
        for side, batch in batches.items():
            torch.manual_seed(args.seed)  # the same dropout masks on both sides
            losses[side] = model(batch, return_logits=False).loss.item()
        if abs(losses["ours"] - losses["theirs"]) > 1e-6:
            raise RuntimeError(f"{name}: loss from cached features {losses['ours']} vs tower {losses['theirs']}")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(batch: ModelInput) -> None:
            train_step(model, lambda: model(batch, return_logits=False).loss)
            optimizer.step()

        t = interleaved({side: (lambda b=batch: step(b)) for side, batch in batches.items()},
                        warmup=1, repeats=args.repeats)
        # the target counts only if the slowest cached step still beats the fastest tower step by it
        worst[name] = min(r for r, _ in t.raw["theirs"]) / max(r for r, _ in t.raw["ours"])
        rows.append((f"{name} train steps/s", *throughput_row("", 1.0, t, args.target)[1:]))
        timings[name] = t
        print(f"{name}: slowest cached step {worst[name]:.1f}x faster than the fastest tower step "
              f"(target {args.target:.0f}x: {'met' if worst[name] >= args.target else 'MISSED'})", flush=True)
    print_table(f"train step, batch {args.batch}, {args.image_size} px, {args.text_tokens} caption tokens per row",
                rows, ours="cached", theirs="tower")
    return {"config": config_json(args), "rows": rows_json(rows, theirs="tower"), "worst_ratio": worst,
            "target_met": all(w >= args.target for w in worst.values()), "timings": timings_json(**timings)}


# --- lora: full fine-tuning vs LoRA vs QLoRA (scripts/bench_lora.py) ----------------------------

def _lora_module():
    """scripts/bench_lora.py (it imports its helpers from this file as the module `bench`)."""
    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    import bench_lora

    return bench_lora


def bench_lora(args: argparse.Namespace) -> dict:
    return _lora_module().run(args)


# --- moe: our MoE Llama vs transformers' Mixtral (scripts/bench_moe.py) ---------------------------

def _moe_module():
    """scripts/bench_moe.py (it imports its helpers from this file as the module `bench`)."""
    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    import bench_moe

    return bench_moe


def bench_moe(args: argparse.Namespace) -> dict:
    return _moe_module().run(args)


# --- command line ------------------------------------------------------------------------------

# What `all` runs. Not lora (it builds and trains three ~240M-parameter models) nor moe (4-5
# minutes at its defaults): either would take `all` past its 10-minute budget; run them by themselves.
BENCHMARKS = ("llama", "llava", "flamingo", "fusion", "features")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    llama = sub.add_parser("llama", help="train step and greedy generation vs transformers.LlamaForCausalLM")
    _text_args(llama, kv_heads=2)
    llama.add_argument("--seq", type=int, default=256)
    llama.add_argument("--batch", type=int, default=8)
    llama.add_argument("--gen-batch", type=int, default=1)
    llama.add_argument("--gen-prompt", type=int, default=32)
    llama.add_argument("--gen-tokens", type=int, default=64)
    llama.set_defaults(func=bench_llama)
    llava = sub.add_parser("llava", help="LLaVA train step and generation vs transformers.LlavaForConditionalGeneration")
    _text_args(llava, kv_heads=2)
    _pair_args(llava, text_tokens=64)
    llava.set_defaults(func=bench_llava)
    flamingo = sub.add_parser("flamingo", help="deep fusion train step and generation vs transformers' Idefics v1")
    _text_args(flamingo, kv_heads=None)  # Idefics' attention has no grouped kv heads
    _pair_args(flamingo, text_tokens=128)
    flamingo.add_argument("--latents", type=int, default=64)
    flamingo.add_argument("--resampler-depth", type=int, default=2)
    flamingo.add_argument("--cross-every", type=int, default=2, help="a cross-attention block before every N-th layer")
    flamingo.set_defaults(func=bench_flamingo)
    fusion = sub.add_parser("fusion", help="LLaVA vs Flamingo on the same backbone, shapes data and steps")
    fusion.add_argument("--steps", type=int, default=300)
    fusion.add_argument("--batch", type=int, default=32)
    fusion.add_argument("--eval-images", type=int, default=64)
    fusion.add_argument("--seed", type=int, default=0)
    for flag in ("--dim", "--layers"):
        fusion.add_argument(flag, type=int, default=None, help="override the text backbone of configs/shapes.yaml")
    fusion.set_defaults(func=bench_fusion)
    features = sub.add_parser("features", help="emoji recipe train step: cached tower features vs the frozen tower")
    features.add_argument("--batch", type=int, default=32)
    features.add_argument("--image-size", type=int, default=224)
    features.add_argument("--text-tokens", type=int, default=12, help="caption tokens after the image, per row")
    features.add_argument("--target", type=float, default=5.0, help="cached must be this much faster (slowest repeat)")
    features.add_argument("--seed", type=int, default=0)
    features.set_defaults(func=bench_features)
    lora = sub.add_parser("lora", help="full fine-tuning vs LoRA vs QLoRA: peak memory and step time; vlm memory's estimates")
    _lora_module().add_arguments(lora)
    lora.set_defaults(func=bench_lora)
    moe = sub.add_parser("moe", help="MoE Llama train step and greedy generation vs transformers.MixtralForCausalLM")
    _moe_module().add_arguments(moe)
    moe.set_defaults(func=bench_moe)
    every = sub.add_parser("all", help="every benchmark but lora and moe at its defaults, one after the other")
    for p in (llama, llava, flamingo, fusion, features, lora, moe, every):
        p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)")
        p.add_argument("--out-dir", type=Path, default=RESULTS, help="where <name>.json (and plots) go")
    for p in (llama, llava, flamingo, fusion, features, lora, moe):
        p.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
        p.add_argument("--json", type=Path, default=None, help="write the results here instead of OUT_DIR/<name>.json")
    for p in (llama, llava, flamingo, moe):
        p.add_argument("--profile", action="store_true", help="side-by-side torch.profiler tables of both sides")
    for p in (llama, llava, flamingo):
        p.add_argument("--compile", action="store_true", help="also time torch.compile of our train step vs eager")
        p.add_argument("--compile-only", action="store_true", help="only eager vs compiled (no anchor comparison)")
        p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager/aot_eager: trace only)")
        p.add_argument("--compile-modes", nargs="+", choices=["regional", "whole"], default=["regional", "whole"],
                       help="regional: per block (model.compile: true); whole: forward + loss as one graph")
    return parser


def _text_args(p: argparse.ArgumentParser, *, kv_heads: int | None) -> None:
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    if kv_heads is not None:
        p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--vocab", type=int, default=32000)


def _pair_args(p: argparse.ArgumentParser, *, text_tokens: int) -> None:
    p.add_argument("--vision-width", type=int, default=256)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=text_tokens, help="text tokens after the image, per row")
    p.add_argument("--gen-prompt", type=int, default=16, help="text tokens after the image in the prompt")
    p.add_argument("--gen-tokens", type=int, default=32)


def run_one(args: argparse.Namespace, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    print(f"== {args.bench} ==", flush=True)
    start = time.perf_counter()
    result = args.func(args)
    result.update(seconds=time.perf_counter() - start, machine=machine_info(),
                  command=" ".join(["python scripts/bench.py", *argv]))
    path = args.json or args.out_dir / f"{args.bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{args.bench}: {result['seconds']:.0f} s, results in {path}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.bench != "all":
        run_one(args, argv)
        return 0
    start = time.perf_counter()
    for name in BENCHMARKS:
        run_one(parser.parse_args([name, "--threads", str(args.threads), "--out-dir", str(args.out_dir)]), [name])
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
