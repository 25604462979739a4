"""`python scripts/bench.py lora`: peak training memory and step time of full fine-tuning vs LoRA vs
QLoRA of one LLaVA model on the CPU, and `vlm memory`'s estimate for the Llama-3.2-1B + ViT-L/14
recipes with LoRA and QLoRA on one 80 GB GPU.

The three variants start from the same weights (same seed) and train on the same batch, each as
`vlm fit` builds it (`vlm.training.lora.LoRARun`: adapters on, the stage's freezing, then NF4):
- full: configs/stage/instruct.yaml, projector + Llama train, the tower frozen (LLaVA's fine-tuning);
- lora: configs/peft/lora.yaml, rank-16 adapters on every Llama linear, the projector fully;
- qlora: configs/peft/qlora.yaml, the same with the adapted bases in NF4 (computing in fp32 here).
Each uses its recipe's AdamW (`vlm.training.optim.build_optimizer`, warm-up left out), and a step
is Lightning's: forward, zero_grad, backward, AdamW step.

Peak memory is measured by torch's profiler (`profile_memory=True`), which records every allocation
and free of torch's CPU allocator with its address, size and time. One profiling session per
variant spans its build and `--memory-steps` steps, so its live total starts from zero: weights,
AdamW moments, gradients, activations and temporaries are all allocations seen in the session;
nothing is counted by hand. A step's peak is the largest live total inside it. The first step
(it creates AdamW's moments, and its forward has no old gradients beside it) is not reported.
Not RSS, because in one process that holds the three models (so that their steps can interleave)
the RSS also holds Python, the libraries and glibc's free lists, and it only grows; the RSS growth
(the peak RSS of one more step, run without the profiler, minus the RSS before the build) is kept
as a cross-check. QLoRA's build quantises a dense model, as `vlm fit` does: that transient is
reported ("build peak"), not counted as training.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import dataclasses
import gc
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vlm.model import ModelInput, VLMConfig

VARIANTS = {"full": "configs/stage/instruct.yaml", "lora": "configs/peft/lora.yaml", "qlora": "configs/peft/qlora.yaml"}
ESTIMATE_DIR = "configs/llama32_1b_clip"
GPU_BYTES = 80 * 2**30  # one 80 GB card (A100/H100 80GB: 80 GiB), CUDA context not counted
TARGETS = {"fewer_params": 0.95, "memory_saved": 0.40, "qlora_weights": 0.35}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Llama-3.2-1B's depth and head ratio at half its width and a 32k vocabulary: ~240M parameters,
    # a full fine-tuning step of a few seconds on one core; dim 1536 x 12 took ~14 s of CPU per step.
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vision-width", type=int, default=256)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=64, help="learned text tokens after the image, per row")
    p.add_argument("--memory-steps", type=int, default=3, help="profiled steps per variant, 2 or more (the first "
                   "creates AdamW's moments; the others' peaks are reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimate-base", default=f"{ESTIMATE_DIR}/base.yaml", help="recipe for `vlm memory`'s estimates")
    p.add_argument("--estimate-fusions", nargs="*", default=[f"{ESTIMATE_DIR}/llava.yaml", f"{ESTIMATE_DIR}/flamingo.yaml"],
                   help="fusion files composed with --estimate-base (none: no estimates)")


# --- the three variants --------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    table: Any  # vlm.stages.ParameterTable
    losses: list[float] = dataclasses.field(default_factory=list)

    def step(self, batch: ModelInput) -> float:
        loss = self.model(batch, return_logits=False).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        return self.losses[-1]


def vlm_config(args: argparse.Namespace) -> VLMConfig:
    from bench import IMAGE, ffn_dim, open_clip_vision

    from vlm.fusion import FusionConfig
    from vlm.model import VLMConfig
    from vlm.text.llama import LlamaConfig

    text = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads, vocab_size=args.vocab,
                       hidden_dim=ffn_dim(args.dim), rope_theta=500000.0)
    vision = open_clip_vision(args, feature_layer=-2, keep_prefix_tokens=False, quick_gelu=True)
    return VLMConfig(text=text, vision=vision, fusion=FusionConfig("llava", {"projector": "mlp2x_gelu"}), image_token_id=IMAGE)


def build_variant(name: str, config: VLMConfig, *, seed: int) -> Variant:
    """The model of `VARIANTS[name]`'s recipe section, built, adapted and frozen as `vlm fit` does."""
    from bench import load_yaml

    from vlm.model import build_model
    from vlm.stages import set_trainable
    from vlm.training.lora import LoRARun, lora_settings
    from vlm.training.optim import OptimConfig, build_optimizer

    section = load_yaml(VARIANTS[name])["model"]
    torch.manual_seed(seed)
    model = build_model(config)
    lora = lora_settings(section.get("lora"))
    run = LoRARun(lora, text_checkpoint=None, init_checkpoint=None) if lora else None
    if run:
        run.apply(model)
    table = set_trainable(model, section["stage"])
    if run:
        run.quantize(model)
    optim = OptimConfig(**{**section.get("optim", {}), "warmup_steps": 0})  # the moments are the same; lr > 0 from step 1
    optimizer, _ = build_optimizer(model.train(), optim, total_steps=1000)
    return Variant(name, model, optimizer, table)


def make_batch(args: argparse.Namespace, tokens_per_image: int) -> ModelInput:
    from bench import image_rows, random_text

    from vlm.model import ModelInput

    ids, labels = image_rows(args.batch, tokens_per_image, random_text(args.batch, args.text_tokens, args.vocab))
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    return ModelInput(ids, torch.ones_like(ids), pixels, torch.arange(args.batch), labels)


# --- measured memory -----------------------------------------------------------------------------

def measure(name: str, config: VLMConfig, args: argparse.Namespace) -> tuple[Variant, ModelInput, dict]:
    """Build `name` and run `--memory-steps` steps under the profiler: the live totals it saw. Then
    one more step without it, for the RSS cross-check (the profiler's own buffers would count)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    rss_before = _settle()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("bench_lora.build"):
            variant = build_variant(name, config, seed=args.seed)
        batch = make_batch(args, variant.model.tokens_per_image)
        rss_built = _settle(collect=False)
        for _ in range(args.memory_steps):
            with record_function("bench_lora.step"):
                variant.step(batch)
    events = session_events(prof)
    live = live_totals(events)
    (build,), steps = ranges(events, "bench_lora.build"), ranges(events, "bench_lora.step")
    memory = {"weights_bytes": _at(live, build[1]), "build_peak_bytes": _peak(live, *build),
              "step_peak_bytes": [_peak(live, *window) for window in steps],
              "top_ops_self_s": op_seconds(events, steps[1:])}
    del prof, events, live
    measured = _settle() is not None  # resets the peak RSS
    variant.step(batch)
    memory["rss_weights_bytes"] = rss_built - rss_before if measured else None
    memory["rss_growth_bytes"] = _status_kib("VmHWM") * 1024 - rss_before if measured else None
    return variant, batch, memory


def session_events(prof: Any) -> list[Any]:
    """Every event the profiler recorded (ops, annotations, allocations), children included."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        events.append(stack.pop())
        stack.extend(events[-1].children)
    return events


def live_totals(events: list[Any]) -> list[tuple[int, int]]:
    """(time ns, live bytes) after each CPU allocation or free of the session, in time order. A free
    counts only if the session saw the allocation (the allocator may report blocks of before)."""
    from torch._C._profiler import _EventType

    allocations = sorted((e.start_time_ns, e.typed[1].ptr, e.typed[1].alloc_size) for e in events
                         if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu")
    sizes: dict[int, int] = {}
    total, out = 0, []
    for time_ns, ptr, size in allocations:
        if size > 0:
            sizes[ptr] = size
        elif ptr in sizes:
            size = -sizes.pop(ptr)
        else:
            continue
        total += size
        out.append((time_ns, total))
    return out


def ranges(events: list[Any], name: str) -> list[tuple[int, int]]:
    """(start, end) ns of every `record_function(name)` range, in order."""
    return sorted((e.start_time_ns, e.end_time_ns) for e in events if e.name == name)


def op_seconds(events: list[Any], windows: list[tuple[int, int]], *, top: int = 8) -> dict[str, float]:
    """Self CPU seconds per op name inside `windows` (a mean over them), the `top` largest. Recorded
    with the profiler on, so useful for shares, not as step times."""
    from torch._C._profiler import _EventType

    def is_op(event: Any) -> bool:
        return event.typed[0] == _EventType.TorchOp and not event.name.startswith("bench_lora.")

    totals: dict[str, float] = {}
    for e in events:
        if is_op(e) and any(start <= e.start_time_ns <= end for start, end in windows):
            own = e.duration_time_ns - sum(c.duration_time_ns for c in e.children if is_op(c))
            totals[e.name] = totals.get(e.name, 0.0) + own / 1e9 / len(windows)
    return dict(sorted(totals.items(), key=lambda item: -item[1])[:top])


def _at(live: list[tuple[int, int]], time_ns: int) -> int:
    """The live total at `time_ns`."""
    index = bisect.bisect_right(live, (time_ns, float("inf")))
    return live[index - 1][1] if index else 0


def _peak(live: list[tuple[int, int]], start: int, end: int) -> int:
    return max([_at(live, start)] + [total for t, total in live if start <= t <= end])


def _settle(*, collect: bool = True) -> int | None:
    """Free what can be freed, reset the peak RSS (Linux); the RSS in bytes, None if unavailable."""
    if collect:  # cycles; a build leaves none (its freed tensors went by reference counting)
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def weight_bytes(variant: Variant) -> dict[str, int]:
    """Bytes of the adapted linears' bases as stored (NF4 codes, scales and factors) and in bf16,
    and of every parameter in bf16 (what QLoRA's weights compare with)."""
    from vlm.adapters import lora_modules

    bases = [m.base.weight for m in lora_modules(variant.model).values()]
    base_ids = {id(w) for w in bases}
    numel = sum(w.numel() for w in bases)
    others = sum(p.numel() for p in variant.model.parameters() if id(p) not in base_ids)
    return {"adapted_stored": _storage_bytes(bases), "adapted_bf16": 2 * numel, "other_bf16": 2 * others}


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    storages: dict[int, int] = {}
    for tensor in tensors:
        for inner in _plain(tensor):
            storages[inner.untyped_storage().data_ptr()] = inner.untyped_storage().nbytes()
    return sum(storages.values())


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors under a tensor subclass (an NF4 weight's codes, scales, factors), or the tensor."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in _plain(getattr(tensor, name))]


# --- `vlm memory` for the GPU recipes ------------------------------------------------------------

def estimates(args: argparse.Namespace) -> dict[str, dict]:
    """`vlm memory --config BASE --config FUSION --config VARIANT --devices 1` for each fusion and
    variant (LoRA and QLoRA also under bf16-true, for the weights ratio): its table, and its numbers."""
    from vlm.training.memory import estimate_memory

    out = {}
    bf16 = [(f"{name} bf16-true", ["--trainer.precision", "bf16-true"]) for name in ("lora", "qlora")]
    for fusion in args.estimate_fusions:
        for name, extra in [(name, []) for name in VARIANTS] + bf16:
            files = [args.estimate_base, fusion, VARIANTS[name.split()[0]]]
            command = " ".join(["vlm memory", *(f"--config {f}" for f in files), "--devices 1", *extra])
            out[f"{Path(fusion).stem} {name}"] = estimate_json(estimate_memory(files, devices=1, cli_args=extra), command)
    return out


def estimate_json(estimate: Any, command: str) -> dict:
    """The numbers of the table `vlm memory` prints (`str(estimate)`, kept as `table`), in bytes."""
    total, checkpointing = estimate.total(False), estimate.total(True)
    return {"command": command, "precision": estimate.precision.name, "batch_size": estimate.shapes.batch_size,
            "seq_len": estimate.shapes.seq_len,
            "parameters": {part: {"trainable": t, "lora": estimate.parameters.adapters.get(part, 0), "frozen": f}
                           for part, (t, f) in estimate.parameters.rows.items()},
            "static_bytes": {k: {"trainable": t, "frozen": f} for k, (t, f) in estimate.static.items()},
            "activation_bytes": {k: {"no_checkpointing": a, "checkpointing": c} for k, (a, c) in estimate.activations.items()},
            "total_bytes": total, "total_checkpointing_bytes": checkpointing,
            "fits_80gb": total <= GPU_BYTES, "fits_80gb_checkpointing": checkpointing <= GPU_BYTES, "table": str(estimate)}


def print_estimates(found: dict[str, dict]) -> None:
    if not found:
        return
    first = next(iter(found.values()))
    print(f"\nvlm memory, one device, {first['batch_size']} x {first['seq_len']} tokens per device (recipe precision unless "
          f"named); GiB")
    print(f"{'recipe':<28} {'trainable':>14} {'weights':>8} {'grad+adam':>9} {'activ.':>8} {'total':>8} {'ckpt total':>10}"
          "  80 GB")
    for name, e in found.items():
        trainable = sum(p["trainable"] for p in e["parameters"].values())
        weights = sum(e["static_bytes"]["weights"].values())
        states = sum(sum(e["static_bytes"][k].values()) for k in ("gradients", "optimizer"))
        activ = sum(a["no_checkpointing"] for a in e["activation_bytes"].values())
        fits = ("yes" if e["fits_80gb"] else "no") + (", ckpt yes" if e["fits_80gb_checkpointing"] else ", ckpt no")
        print(f"{name:<28} {trainable:>14,} {weights / 2**30:>8.2f} {states / 2**30:>9.2f} {activ / 2**30:>8.2f} "
              f"{e['total_bytes'] / 2**30:>8.2f} {e['total_checkpointing_bytes'] / 2**30:>10.2f}  {fits}", flush=True)


# --- the benchmark -------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    from bench import config_json, interleaved, timings_json

    if args.memory_steps < 2:
        raise ValueError("--memory-steps must be 2 or more: the first step creates AdamW's moments and is not reported")
    config = vlm_config(args)
    variants, memory = {}, {}
    for name in VARIANTS:  # one at a time, so each profiling session sees only its own variant
        variant, batch, memory[name] = measure(name, config, args)
        variants[name] = variant
        peaks = [round(b / 2**20) for b in memory[name]["step_peak_bytes"]]
        losses = [round(x, 4) for x in variant.losses]
        print(f"{name}: built, {args.memory_steps} profiled steps, peaks {peaks} MiB, losses {losses}", flush=True)
    first = {name: v.losses[0] for name, v in variants.items()}
    if abs(first["lora"] - first["full"]) > 1e-5 * max(1.0, abs(first["full"])):  # B = 0: the adapted model is its base
        raise RuntimeError(f"first-step loss: lora {first['lora']} vs full {first['full']}; the bases differ")
    timings = interleaved({name: (lambda v=v: v.step(batch)) for name, v in variants.items()}, warmup=1, repeats=args.repeats)
    result = report(args, variants, memory, timings, seq=batch.input_ids.shape[1])
    result["estimates"] = estimates(args)
    print_estimates(result["estimates"])
    result.update(config=config_json(args), model=config.to_dict(), timings=timings_json(train_step=timings))
    return result


def report(args: argparse.Namespace, variants: dict[str, Variant], memory: dict, timings: Any, *, seq: int) -> dict:
    """Print the table and the targets; the JSON's rows, targets and measurements."""
    tables = {name: v.table for name, v in variants.items()}
    steady = {name: m["step_peak_bytes"][1:] for name, m in memory.items()}  # the first step creates AdamW's moments
    walls = {name: [wall for wall, _ in runs] for name, runs in timings.raw.items()}
    qlora = weight_bytes(variants["qlora"])
    rows = table_rows(variants, memory, steady, timings, walls)
    print(f"\nlora: LLaVA, Llama dim {args.dim} x {args.layers} layers ({args.heads} heads, {args.kv_heads} kv), vocab "
          f"{args.vocab}; ViT width {args.vision_width} x {args.vision_layers}, {args.image_size} px / {args.patch}; batch "
          f"{args.batch} x seq {seq}; fp32, {torch.get_num_threads()} thread(s); {args.repeats} interleaved repeats")
    print(f"{'metric':<36} {'full':>14} {'lora':>14} {'qlora':>14}")
    for metric, values in rows.items():
        print(f"{metric:<36} " + " ".join(f"{_shown(metric, values[n]):>14}" for n in VARIANTS), flush=True)
    for name, m in memory.items():
        ops = ", ".join(f"{op} {sec:.2f}" for op, sec in list(m["top_ops_self_s"].items())[:5])
        print(f"{name} self CPU s per profiled step: {ops}")
    targets = check_targets(tables, steady, qlora)
    return {"rows": [{"metric": m.strip(), **v} for m, v in rows.items()], "targets": targets, "memory": memory,
            "qlora_weight_bytes": qlora, "seq": seq, "losses": {n: v.losses for n, v in variants.items()},
            "parameters": {n: {part: {"trainable": tr, "lora": t.adapters.get(part, 0), "frozen": fr}
                               for part, (tr, fr) in t.rows.items()} for n, t in tables.items()},
            "step_s": {n: {"median": statistics.median(w), "min": min(w), "max": max(w)} for n, w in walls.items()}}


def table_rows(variants: dict[str, Variant], memory: dict, steady: dict, timings: Any, walls: dict) -> dict[str, dict]:
    """metric -> {variant: value}; memory peaks are the highest steady-state step of each."""
    tables = {name: v.table for name, v in variants.items()}
    peaks = {name: max(p) for name, p in steady.items()}

    def mib(key: str) -> dict:
        return {n: None if m[key] is None else m[key] / 2**20 for n, m in memory.items()}

    return {"trainable parameters": {n: t.trainable for n, t in tables.items()},
            "  of which LoRA": {n: sum(t.adapters.values()) for n, t in tables.items()},
            "frozen parameters": {n: t.frozen for n, t in tables.items()},
            "weights after build MiB (profiler)": mib("weights_bytes"),
            "peak train step MiB (profiler)": {n: p / 2**20 for n, p in peaks.items()},
            "  saved vs full": {n: 1 - p / peaks["full"] for n, p in peaks.items()},
            "peak RSS growth MiB (cross-check)": mib("rss_growth_bytes"),
            "build peak MiB (profiler)": mib("build_peak_bytes"),
            "step s, median": dict(timings),
            "step s, min": {n: min(w) for n, w in walls.items()},
            "step s, max": {n: max(w) for n, w in walls.items()},
            "speed vs full (median)": {n: timings["full"] / t for n, t in timings.items()},
            "step CPU s, median": dict(timings.cpu),
            "first-step loss": {n: v.losses[0] for n, v in variants.items()}}


def check_targets(tables: dict, steady: dict, qlora: dict[str, int]) -> dict[str, dict]:
    """The issue's targets, each met or missed by its worst case (memory: the highest LoRA step
    peak against the lowest full one); printed."""
    fewer = 1 - tables["lora"].trainable / tables["full"].trainable
    saved = 1 - max(steady["lora"]) / min(steady["full"])
    adapted = qlora["adapted_stored"] / qlora["adapted_bf16"]
    whole = (qlora["adapted_stored"] + qlora["other_bf16"]) / (qlora["adapted_bf16"] + qlora["other_bf16"])
    targets = {
        "lora_trains_95pct_fewer_parameters": {"value": fewer, "target": TARGETS["fewer_params"]},
        "lora_saves_40pct_peak_memory": {"value": saved, "target": TARGETS["memory_saved"],
                                         "rule": "highest LoRA steady step peak vs lowest full steady step peak"},
        "qlora_weights_35pct_of_bf16": {"value": adapted, "target": TARGETS["qlora_weights"],
                                        "of": "the adapted linears' base weights (what QLoRA quantises)", "whole_model": whole,
                                        "whole_model_met": whole <= TARGETS["qlora_weights"]}}
    for key, target in targets.items():
        target["met"] = target["value"] <= target["target"] if key.startswith("qlora") else target["value"] >= target["target"]
    shown = {key: "met" if t["met"] else "MISSED" for key, t in targets.items()}
    print(f"target LoRA trains >= 95% fewer parameters: {fewer:.1%} fewer ({shown['lora_trains_95pct_fewer_parameters']})")
    print(f"target LoRA saves >= 40% of peak memory (its highest step peak vs full's lowest): {saved:.1%} "
          f"({shown['lora_saves_40pct_peak_memory']})")
    whole_shown = "met" if targets["qlora_weights_35pct_of_bf16"]["whole_model_met"] else "missed"
    print(f"target QLoRA's weights <= 35% of bf16's: adapted linears {adapted:.1%} ({shown['qlora_weights_35pct_of_bf16']}); "
          f"whole model, the rest in bf16, {whole:.1%} ({whole_shown})", flush=True)
    return targets


def _shown(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if "saved" in metric:
        return f"{value:.1%}"
    if "speed" in metric:
        return f"{value:.2f}x"
    if "parameters" in metric or "LoRA" in metric:
        return f"{value:,}"
    if "loss" in metric:
        return f"{value:.4f}"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
