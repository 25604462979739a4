"""Packing vs padding: train-step throughput in real (non-pad) tokens/s on the same samples.

    python scripts/bench_packing.py --fusion llava --repeats 5

A mixed-length mix of caption, chat and interleaved samples (synthesized encoded samples: random
token ids with each kind's label layout, random images; the lengths below) is run through the
model once per repeat as padded batches (`--batch` samples per batch, padded to the longest, in
the stream's order) and once as packed rows (`vlm.data.packing.Packer`, `--packed-rows` rows of
`--max-len` tokens per batch). Each pass is zero_grad + forward + backward of every batch (no
optimizer step, alike on both sides), through `VisionLanguageModel` with the data layer's collator.
Passes alternate (interleaved repeats, order flipped each time); the median pass time gives tokens/s,
with the min-max over the repeats, the ratio of median process CPU times (which other processes'
load moves less), and each repeat's ratio (its padded and packed passes ran back to back); the
target counts as met when the slowest repeat meets it. Real tokens: attention_mask ones (text and image positions).

Before timing, the mean next-token loss over all samples is computed both ways (sum of token losses
over all labelled tokens); they must agree within `--loss-tol` (relative), else the script fails.
Writes `<out-dir>/packing-<fusion>.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from bench import interleaved, machine_info, train_step  # noqa: E402

from vlm.data.collate import Batch, Collator  # noqa: E402
from vlm.data.formats import EncodedSample  # noqa: E402
from vlm.data.packing import Packer  # noqa: E402
from vlm.fusion import FusionConfig  # noqa: E402
from vlm.model import VLMConfig, VisionLanguageModel, build_model  # noqa: E402
from vlm.text.llama import LlamaConfig  # noqa: E402
from vlm.text.loss import shift_labels  # noqa: E402
from vlm.vision import VisionConfig  # noqa: E402

IGNORE, IMAGE_ID, PAD_ID = -100, 5, 0
# kind: (share of the samples, images (low, high), text tokens (low, high)), uniform draws.
MIX = {"caption": (0.4, (1, 1), (8, 40)), "chat": (0.35, (0, 1), (40, 300)), "interleaved": (0.25, (1, 3), (100, 500))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fusion", choices=["llava", "flamingo"], default="llava")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    p.add_argument("--packed-rows", type=int, default=4, help="rows per packed batch")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per packed row (and the longest sample)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--image-size", type=int, default=32, help="the tiny ViT's input (patch 8: 16 tokens per image)")
    p.add_argument("--kernel", choices=["auto", "sdpa", "flex"], default="auto", help="Llama.packed_attention")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: see scripts/bench.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=1.8, help="packed / padded real tokens/s to meet")
    p.add_argument("--loss-tol", type=float, default=1e-5, help="relative difference of the two mean losses allowed")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> VisionLanguageModel:
    torch.manual_seed(args.seed)
    options = {} if args.fusion == "llava" else {"num_latents": 16, "resampler_depth": 1, "cross_attn_every": 2,
                                                 "cross_attn_heads": 4, "cross_attn_head_dim": 32, "gate_init": 0.5}
    config = VLMConfig(
        text=LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                         vocab_size=args.vocab, hidden_dim=int(8 * args.dim / 3 / 64 + 1) * 64, max_seq_len=args.max_len),
        vision=VisionConfig(model="vit_tiny_patch16_224", model_kwargs=dict(
            img_size=args.image_size, patch_size=8, depth=2, embed_dim=64, num_heads=2)),
        fusion=FusionConfig(args.fusion, options), image_token_id=IMAGE_ID)
    model = build_model(config).train()
    model.text.packed_attention = args.kernel
    return model


def make_samples(args: argparse.Namespace, tokens_per_image: int) -> list[EncodedSample]:
    """`args.samples` encoded samples drawn from MIX, each at most `max_len` tokens once expanded."""
    rng = random.Random(args.seed)
    kinds, weights = list(MIX), [share for share, _, _ in MIX.values()]
    samples = []
    for index in range(args.samples):
        kind = rng.choices(kinds, weights)[0]
        _, (low_images, high_images), (low, high) = MIX[kind]
        images = rng.randint(low_images, high_images)
        length = min(rng.randint(low, high), args.max_len - images * tokens_per_image - 2)
        samples.append(encoded(kind, f"{kind}{index}", images, length, rng, args))
    return samples


def encoded(kind: str, key: str, images: int, length: int, rng: random.Random, args) -> EncodedSample:
    """Random text ids; labels as the kind learns them: a caption its caption, a chat its second half
    (the answer), interleaved all text. Images after the first token, then spread through the text."""
    text = [rng.randrange(PAD_ID + 7, args.vocab) for _ in range(length)]
    learned = {"caption": range(0, length), "chat": range(length // 2, length), "interleaved": range(0, length)}[kind]
    labels = [token if i in learned else IGNORE for i, token in enumerate(text)]
    cuts = sorted(rng.randrange(length) for _ in range(images)) if kind == "interleaved" else [0] * images
    ids, label_ids, start = [1], [IGNORE], 0  # a begin-of-text token, never learned
    for cut in cuts:
        ids += text[start:cut] + [IMAGE_ID]
        label_ids += labels[start:cut] + [IGNORE]
        start = cut
    ids += text[start:]
    label_ids += labels[start:]
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    pictures = [torch.randn(3, args.image_size, args.image_size, generator=generator) for _ in range(images)]
    return EncodedSample(key, ids, label_ids, pictures)


def batches(args: argparse.Namespace, model: VisionLanguageModel, samples: list[EncodedSample]) -> dict[str, list[Batch]]:
    collator = Collator(pad_id=PAD_ID, image_id=IMAGE_ID, image_token_count=model.tokens_per_image, max_length=args.max_len)
    padded = [collator(samples[i : i + args.batch]) for i in range(0, len(samples), args.batch)]
    rows = list(Packer(args.max_len, image_token_count=model.tokens_per_image)(samples))
    packed = [collator(rows[i : i + args.packed_rows]) for i in range(0, len(rows), args.packed_rows)]
    return {"padded": padded, "packed": packed}


def mean_loss(model: VisionLanguageModel, batches: list[Batch]) -> float:
    """The mean next-token loss over every labelled token of all batches (float64 sum)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            tokens = int((shift_labels(batch.labels) != IGNORE).sum())
            total += model(batch, return_logits=False).loss.double() * tokens
            count += tokens
    return float(total / count)


def epoch(model: VisionLanguageModel, batches: list[Batch]) -> Callable[[], None]:
    def run() -> None:
        for batch in batches:
            train_step(model, lambda: model(batch, return_logits=False).loss)
    return run


def summary(args, sets: dict[str, list[Batch]], losses: dict[str, float], timings) -> dict:
    real = {name: int(sum(int(b.attention_mask.sum()) for b in group)) for name, group in sets.items()}
    positions = {name: sum(b.input_ids.numel() for b in group) for name, group in sets.items()}
    rates = {name: {"median": real[name] / timings[name],
                    "min": min(real[name] / wall for wall, _ in timings.raw[name]),
                    "max": max(real[name] / wall for wall, _ in timings.raw[name])} for name in sets}
    cpu_rates = {name: real[name] / timings.cpu[name] for name in sets}  # per second of this process's CPU time
    ratio = {"median": rates["packed"]["median"] / rates["padded"]["median"],
             "slowest_packed_over_fastest_padded": rates["packed"]["min"] / rates["padded"]["max"],
             "cpu_time": cpu_rates["packed"] / cpu_rates["padded"],
             # repeat i ran one padded and one packed pass back to back: their ratio shares the load
             "per_repeat": [padded / packed for (padded, _), (packed, _) in zip(timings.raw["padded"], timings.raw["packed"])]}
    return {"title": f"packing vs padding, {args.fusion}, {args.samples} samples, rows of {args.max_len}",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "mix": MIX,
            "real_tokens": real["padded"], "positions": positions, "fill": {n: real[n] / positions[n] for n in sets},
            "batches": {name: len(group) for name, group in sets.items()}, "tokens_per_s": rates, "tokens_per_cpu_s": cpu_rates,
            "ratio": ratio,
            "target": args.target, "target_met": min(ratio["per_repeat"]) >= args.target,
            "runs_wall_cpu_s": timings.raw,
            "mean_loss": losses, "loss_relative_difference": abs(losses["packed"] - losses["padded"]) / abs(losses["padded"]),
            "machine": machine_info()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args)
    samples = make_samples(args, model.tokens_per_image)
    sets = batches(args, model, samples)
    real = {name: sum(int(b.attention_mask.sum()) for b in group) for name, group in sets.items()}
    if real["padded"] != real["packed"]:
        raise SystemExit(f"packed and padded batches hold different tokens ({real}): a sample was cut")
    losses = {name: mean_loss(model, group) for name, group in sets.items()}
    difference = abs(losses["packed"] - losses["padded"]) / abs(losses["padded"])
    print(f"mean loss: padded {losses['padded']:.8f}, packed {losses['packed']:.8f} (relative difference {difference:.1e})")
    if difference > args.loss_tol:
        print(f"FAIL: the losses differ by more than --loss-tol {args.loss_tol:g}", file=sys.stderr)
        return 1
    timings = interleaved({name: epoch(model, group) for name, group in sets.items()}, warmup=1, repeats=args.repeats)
    result = summary(args, sets, losses, timings)
    for name in sets:
        r = result["tokens_per_s"][name]
        print(f"{name:>7}: {r['median']:,.0f} real tokens/s (min-max {r['min']:,.0f}-{r['max']:,.0f} over {args.repeats} "
              f"runs), fill {result['fill'][name]:.0%}, {result['batches'][name]} batches")
    ratio = result["ratio"]
    print(f"packed / padded: {ratio['median']:.2f}x median, {ratio['slowest_packed_over_fastest_padded']:.2f}x slowest "
          f"packed over fastest padded, {ratio['cpu_time']:.2f}x in process CPU time; per repeat "
          f"{min(ratio['per_repeat']):.2f}-{max(ratio['per_repeat']):.2f}x; target {args.target:.1f}x "
          f"{'met' if result['target_met'] else 'MISSED'} (by the slowest repeat)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"packing-{args.fusion}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
