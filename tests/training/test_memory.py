"""`vlm memory`: the estimate against peaks measured on real CPU training steps, every shipped recipe,
and the parameter, sharding and precision bookkeeping of the full-size recipe."""

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed._composable import checkpoint
from torch.profiler import ProfilerActivity, profile, record_function

from vlm.model import ModelInput, VLMConfig, build_model
from vlm.stages import set_trainable
from vlm.training.memory import NF4_BYTES, compose, estimate_memory, main, resolve_precision, resolve_strategy
from vlm.training.parallel import blocks as units
from vlm.training.optim import OptimConfig, build_optimizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LLAMA = [str(CONFIGS / f) for f in ("llama32_1b_clip/base.yaml", "llama32_1b_clip/llava.yaml", "stage/align.yaml")]
RECIPES = [
    ["shapes.yaml", "fusion/llava.yaml"],
    ["shapes.yaml", "fusion/flamingo.yaml"],
    *[["llama32_1b_clip/base.yaml", f"llama32_1b_clip/{fusion}.yaml", f"stage/{stage}.yaml"]
      for fusion in ("llava", "flamingo") for stage in ("align", "instruct")],
]
# Strategy and precision files compose with every recipe; the full-size one stands for them here.
EXTRAS = sorted(str(p) for folder in ("strategy", "precision") for p in (CONFIGS / folder).glob("*.yaml"))
IMAGE_ID = 5  # configs/shapes.yaml


def tiny_recipe(tmp_path: Path, fusion: str, stage: str) -> list[str]:
    """shapes.yaml + the fusion file, with a model wide enough that activations dominate (fp32)."""
    override = {"model": {"stage": stage, "config": {
        "text": {"dim": 192, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "hidden_dim": 512, "max_seq_len": 512},
        "vision": {"name": "timm", "model": "vit_tiny_patch16_224", "frozen": False, "feature_layer": -1,
                   "image_size": 64, "model_kwargs": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 2}}}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(override))
    return [str(CONFIGS / "shapes.yaml"), str(CONFIGS / "fusion" / f"{fusion}.yaml"), str(path)]


def real_model(files: list[str]):
    model_section = compose(files)["model"]
    torch.manual_seed(0)
    model = build_model(VLMConfig.from_dict(model_section["config"]))
    set_trainable(model, model_section["stage"])
    return model.train()


def caption_batch(model, batch_size: int, seq_len: int) -> ModelInput:
    """One image per row, its tokens after BOS, labels on the text (no padding: SDPA's flash path)."""
    ids = torch.randint(IMAGE_ID + 1, model.config.text.vocab_size, (batch_size, seq_len))
    ids[:, 1 : 1 + model.tokens_per_image] = IMAGE_ID
    size = model.vision.image_size
    return ModelInput(ids, torch.ones_like(ids), torch.randn(batch_size, 3, size, size), torch.arange(batch_size),
                      torch.where(ids == IMAGE_ID, -100, ids))


def plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding a tensor subclass's data (an NF4 weight's codes and scales), or the tensor."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in plain_tensors(getattr(tensor, name))]


def measured_peak(model, batch) -> int:
    """Peak bytes allocated on the CPU during one steady-state training step in Lightning's order:
    forward, zero_grad, backward, AdamW step.

    torch's profiler (profile_memory=True) records every CPU allocation and free with its size and
    time; the live total starts from what exists before (parameters, buffers, batch). It cannot see
    frees of memory allocated before it started, so the previous step's gradients and the AdamW
    state are made inside the profiled window (zero gradients, one AdamW step), before the step.
    """
    optimizer, _ = build_optimizer(model, OptimConfig(), 10)
    tensors = [inner for t in [*model.parameters(), *model.buffers(), *vars(batch).values()] if t is not None
               for inner in plain_tensors(t)]
    live = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for param in model.parameters():
            param.grad = torch.zeros_like(param) if param.requires_grad else None
        optimizer.step()
        with record_function("measured_step"):
            loss = model(batch, return_logits=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    events = prof.profiler.kineto_results.events()
    start = next(e.start_ns() for e in events if e.name() == "measured_step")
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    totals = itertools.accumulate((e.nbytes() for e in memory), initial=live)
    return max(total for total, e in zip(itertools.islice(totals, 1, None), memory) if e.start_ns() >= start)


@pytest.mark.parametrize("fusion, stage, batch_size, seq_len, checkpointing", [
    ("llava", "full", 8, 256, False),  # every part trains, the vision tower included
    ("flamingo", "full", 4, 256, False),
    ("llava", "align", 2, 512, False),  # frozen text that gradients cross, frozen tower without autograd
    ("flamingo", "instruct", 8, 256, True),  # every block checkpointed
])
def test_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, fusion, stage, batch_size, seq_len, checkpointing):
    files = tiny_recipe(tmp_path, fusion, stage)
    estimate = estimate_memory(files, batch_size=batch_size, seq_len=seq_len).total(checkpointing)
    model = real_model(files)
    if checkpointing:
        for unit in units(model):
            checkpoint(unit)
    peak = measured_peak(model, caption_batch(model, batch_size, seq_len))
    static = sum(map(sum, estimate_memory(files).static.values()))
    assert peak > 2 * static  # activations, not parameters and optimizer state, dominate
    assert abs(estimate - peak) <= 0.25 * peak, f"estimated {estimate / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("recipe", [[str(CONFIGS / f) for f in r] for r in RECIPES] + [[*LLAMA, extra] for extra in EXTRAS],
                         ids=["+".join(r) for r in RECIPES] + [Path(e).name for e in EXTRAS])
def test_every_shipped_recipe_gets_an_estimate(recipe):
    estimate = estimate_memory(recipe)
    assert estimate.total(True) < estimate.total(False)
    assert sum(estimate.activations["text"]) > 0 and sum(estimate.static["weights"]) > 0
    assert "total" in str(estimate)


def test_llama32_1b_clip_weights_and_sharding(tmp_path):
    text = 128257 * 2048 + 2048 + 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048)  # tied output
    block = 2 * 2048 + 3 * 1024 * 1025 + 1024 * 1025 + 4096 * 1025 + 1024 * 4097  # open_clip ResidualAttentionBlock
    vision = 3 * 14 * 14 * 1024 + 1024 + 257 * 1024 + 2 * 1024 + 23 * block  # ViT-L/14 up to block -2 (no ln_post, proj)
    projector = 1024 * 2048 + 2048 + 2048 * 2048 + 2048
    assert 1.23e9 < text < 1.24e9 and 0.28e9 < vision < 0.30e9
    single = estimate_memory(LLAMA)
    assert single.parameters.rows == {"text": (0, text), "vision": (0, vision), "fusion": (projector, 0)}
    assert single.static["weights"] == (4 * projector, 4 * (text + vision))  # bf16-mixed keeps fp32 parameters
    assert single.strategy.devices == 1 and single.precision.name == "bf16-mixed"
    ddp = estimate_memory(LLAMA, devices=8)  # strategy auto on 8 devices: DDP, nothing sharded
    assert ddp.static["weights"] == single.static["weights"]
    assert ddp.static["gradients"][0] == 2 * single.static["gradients"][0]  # plus DDP's gradient buckets
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("trainer:\n  strategy: fsdp\n")
    sharded = estimate_memory([*LLAMA, str(fsdp)], devices=8)
    assert sharded.static["weights"] == (4 * projector // 8, 4 * (text + vision) // 8)
    assert sharded.static["optimizer"][0] == 8 * projector // 8
    # Per-device batch: sharding leaves the activations alone (the peak transient subtracts the
    # gradients already freed, which sharding makes smaller).
    assert {k: v for k, v in sharded.activations.items() if k != "peak transient"} == \
        {k: v for k, v in single.activations.items() if k != "peak transient"}


def test_strategy_and_precision_parsing():
    bf16 = resolve_precision({"precision": "bf16"})
    assert (bf16.name, bf16.param, bf16.compute, bf16.autocast) == ("bf16-mixed", 4, 2, True)
    assert resolve_precision({"precision": "bf16-true"}).param == 2
    assert resolve_precision({"precision": None}).name == "32-true"
    fsdp = {"class_path": "lightning.pytorch.strategies.FSDPStrategy",
            "init_args": {"sharding_strategy": "SHARD_GRAD_OP", "activation_checkpointing_policy": {"x"}}}
    s = resolve_strategy({"strategy": fsdp, "devices": 4, "num_nodes": 2}, {}, bf16, None)
    assert (s.devices, s.weight_shards, s.state_shards, s.gather_bytes, s.checkpointing) == (8, 1, 8, 2, True)
    fsdp2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {"tensor_parallel_size": 1}}
    s = resolve_strategy({"strategy": fsdp2, "devices": 8}, {"activation_checkpointing": True}, bf16, None)
    assert (s.weight_shards, s.state_shards, s.tensor_parallel, s.checkpointing, s.ddp) == (8, 8, 1, True, False)
    fsdp2["init_args"] = {"tensor_parallel_size": 2}  # decoder linears split 2 ways, FSDP over the 4 data-parallel ranks
    s = resolve_strategy({"strategy": fsdp2, "devices": 8}, {}, bf16, None)
    assert (s.weight_shards, s.tensor_split("text.layers.3.feed_forward.w2.weight"), s.tensor_split("text.norm.weight")) == (4, 2, 1)
    fsdp2["init_args"] = {}  # Lightning's default: tensor parallel over the node's devices
    assert resolve_strategy({"strategy": fsdp2, "devices": 8}, {}, bf16, None).tensor_parallel == 8
    s = resolve_strategy({"strategy": "ddp", "devices": "auto"}, {}, bf16, 4)
    assert (s.devices, s.weight_shards, s.ddp, s.checkpointing) == (4, 1, True, False)
    assert resolve_strategy({"strategy": "auto", "devices": 1}, {}, bf16, None).name == "auto (single)"
    with pytest.raises(ValueError, match="deepspeed"):
        resolve_strategy({"strategy": "deepspeed_stage_3", "devices": 8}, {}, bf16, None)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision({"precision": "transformer-engine"})


def test_fp8_plugin_keeps_one_byte_inputs_with_delayed_scaling(tmp_path):
    pytest.importorskip("vlm.training.fp8")
    shapes = [str(CONFIGS / "shapes.yaml"), str(CONFIGS / "fusion" / "llava.yaml")]
    text = {}
    for name, trainer in [("bf16-mixed", {"precision": "bf16-mixed"})] + [
            (recipe, {"precision": None, "plugins": {"class_path": "vlm.training.fp8.Float8Precision", "init_args": {"recipe": recipe}}})
            for recipe in ("tensorwise", "delayed")]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"trainer": trainer}))
        estimate = estimate_memory([*shapes, str(path)])
        text[name] = estimate.activations["text"][0]
    assert estimate.precision.fp8_recipe == "delayed" and estimate.static["weight copies"][0] > 0  # 1-byte weight casts
    assert text["tensorwise"] == text["bf16-mixed"]  # torchao keeps the bf16 input
    assert text["delayed"] < text["bf16-mixed"]


def test_cli_prints_the_table(capsys):
    assert main(["--config", *LLAMA[:1], "--config", LLAMA[1], "--config", LLAMA[2], "--devices", "8", "--seq-len", "1024"]) == 0
    out = capsys.readouterr().out
    assert "weights (fp32)" in out and "AdamW moments" in out and "8 device(s)" in out and "x 1024 tokens" in out
    assert main(["--config", str(CONFIGS / "shapes.yaml"), "--config", str(CONFIGS / "fusion" / "llava.yaml"), "--seq-len", "32"]) == 1
    assert "cannot hold" in capsys.readouterr().err


FP8 = str(CONFIGS / "precision" / "fp8.yaml")


@pytest.mark.parametrize("extra,message", [
    (["--config", str(CONFIGS / "strategy" / "fsdp.yaml"), "--config", FP8],
     "fp8 (configs/precision/fp8.yaml) does not combine with FSDP1 (configs/strategy/fsdp.yaml; Lightning accepts "
     "only its own precision there): use configs/strategy/fsdp2.yaml"),
    (["--config", str(CONFIGS / "strategy" / "fsdp2.yaml"), "--config", FP8,
      "--trainer.strategy.init_args.tensor_parallel_size", "2"],
     "fp8 (configs/precision/fp8.yaml) does not combine with tensor parallelism (tensor_parallel_size > 1): "
     "drop one of them"),
], ids=["fsdp1", "tensor-parallel"])
def test_cli_refuses_what_training_refuses(extra, message, capsys):
    from vlm.cli import main as vlm_main

    shapes = ["--config", str(CONFIGS / "shapes.yaml"), "--config", str(CONFIGS / "fusion" / "llava.yaml")]
    assert vlm_main(["memory", *shapes, *extra, "--devices", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"vlm memory: {message}\n"
    # each part alone is fine; the override reaches the recipe as it does for vlm fit
    assert vlm_main(["memory", *shapes, *extra[:2], "--devices", "2", *extra[4:]]) == 0
    tensor_parallel = [arg for arg in extra[4:] if not arg.startswith("--")]
    assert ("tensor parallel x2" in capsys.readouterr().out) == bool(tensor_parallel)


def test_lora_counts_adapters_and_qlora_nf4_weights():
    lora, qlora = (estimate_memory([*LLAMA, str(CONFIGS / "peft" / name)]) for name in ("lora.yaml", "qlora.yaml"))
    shapes = [(2048, 2048), (2048, 512), (2048, 512), (2048, 2048), (2048, 8192), (2048, 8192), (8192, 2048)]  # q k v o w1 w3 w2
    adapters = 16 * 16 * sum(i + o for i, o in shapes)  # rank 16, 16 layers
    adapted = 16 * sum(i * o for i, o in shapes)
    projector = 1024 * 2048 + 2048 + 2048 * 2048 + 2048
    for estimate in (lora, qlora):
        assert estimate.parameters.adapters == {"text": adapters} and estimate.parameters.rows["fusion"] == (projector, 0)
        assert estimate.parameters.rows["text"][0] == adapters and estimate.parameters.trainable == adapters + projector
        assert estimate.static["gradients"] == (4 * (adapters + projector), 0)  # adapters and projector only (fp32)
        assert estimate.static["optimizer"] == (8 * (adapters + projector), 0)
        assert "of which LoRA" in str(estimate)
    frozen = lora.parameters.frozen  # the adapted weights included
    assert lora.static["weights"][1] == 4 * frozen
    assert abs(qlora.static["weights"][1] - (4 * (frozen - adapted) + NF4_BYTES * adapted)) <= 1
    assert NF4_BYTES / 2 <= 0.35  # QLoRA's adapted weights: at most 35% of their bf16 bytes
    assert lora.static["weight copies"][1] - qlora.static["weight copies"][1] == 2 * adapted  # NF4 keeps no bf16 cast
    assert any(note.startswith("QLoRA: the adapted weights in NF4") for note in qlora.notes)


def test_qlora_estimate_is_within_25_percent_of_the_measured_peak(tmp_path):
    from vlm.adapters import LoRAConfig
    from vlm.training.lora import LoRARun

    files = [*tiny_recipe(tmp_path, "llava", "align"), str(CONFIGS / "peft" / "qlora.yaml")]
    estimate = estimate_memory(files, batch_size=4, seq_len=256).total(False)
    section = compose(files)["model"]
    torch.manual_seed(0)
    model = build_model(VLMConfig.from_dict(section["config"]))
    run = LoRARun(LoRAConfig(**section["lora"]), text_checkpoint=None, init_checkpoint=None)
    run.apply(model)
    set_trainable(model, section["stage"])
    run.quantize(model)
    peak = measured_peak(model.train(), caption_batch(model, 4, 256))
    assert abs(estimate - peak) <= 0.25 * peak, f"estimated {estimate / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"
