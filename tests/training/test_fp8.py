"""fp8 training (vlm.training.fp8): numerics against fp32 on CPU, delayed scaling, the layer filter,
and the precision plugin through `vlm fit`. Everything that is not fp8 runs in fp32."""

import copy
import dataclasses
import functools
import math
import os

import pytest
import torch
from tiny_models import IMAGE_ID, VOCAB, batch_from, images, tiny_model
from torch import nn
from training_helpers import ROOT, fit_args, read_losses, tiny_recipe

from vlm.model import build_model
from vlm.training.fp8 import Float8Precision, convert_to_float8, float8_filter, float8_recipe_of
from vlm.training.fp8_delayed import E4M3, DelayedFloat8Linear, Float8Scaling

RECIPES = ["tensorwise", "rowwise", "delayed"]
E4M3_MAX = torch.finfo(E4M3).max


@pytest.fixture(autouse=True)
def one_thread():
    """These loops are thousands of tiny ops: a second intra-op thread only adds synchronisation, and
    on a busy 2-core machine it made them ~15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB."""
    reference, approx = reference.detach(), approx.detach()
    return float(20 * torch.log10(reference.norm() / (reference - approx).norm()))


# scripts/gpu_check.sh sets VLM_TEST_DEVICE=cuda: the same numerics against bf16 on the GPU's kernels.
DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")
REFERENCE_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_sqnr_against_fp32(recipe):
    torch.manual_seed(0)
    linear = nn.Linear(256, 512).to(DEVICE, REFERENCE_DTYPE)
    nn.init.normal_(linear.weight, std=0.02)
    fp8 = convert_to_float8(copy.deepcopy(linear), recipe=recipe)
    assert float8_recipe_of(fp8) == recipe
    for step in range(3):  # the delayed recipe scales from its history from the second step on
        x = torch.randn(4, 32, 256, device=DEVICE, dtype=REFERENCE_DTYPE)
        x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_fp8 = linear(x_ref), fp8(x_fp8)
        # per-element gradients of a mean loss are tiny: below e5m2's smallest subnormal (1.5e-5)
        # unless scaled, which is what this catches
        grad = torch.randn_like(y_ref) * 1e-6
        y_ref.backward(grad)
        y_fp8.backward(grad)
        assert sqnr(y_ref, y_fp8) >= 18, (step, sqnr(y_ref, y_fp8))
        assert sqnr(linear.weight.grad, fp8.weight.grad) >= 17, (step, sqnr(linear.weight.grad, fp8.weight.grad))
        assert sqnr(x_ref.grad, x_fp8.grad) >= 17, (step, sqnr(x_ref.grad, x_fp8.grad))
        assert sqnr(y_ref, y_fp8) < 40  # really rounded to fp8, not passed through
        linear.zero_grad()
        fp8.zero_grad()


def chain_batches(steps: int = 50, rows: int = 4, length: int = 16) -> list[tuple[list, list]]:
    """Fixed random batches of a learnable rule (each token is the previous one + 7, mod the vocab),
    one image per row: the loss falls smoothly instead of memorising noise."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for step in range(steps):
        starts = torch.randint(6, VOCAB, (rows,), generator=g).tolist()
        token_rows = [[IMAGE_ID] + [6 + (s - 6 + 7 * t) % (VOCAB - 6) for t in range(length)] for s in starts]
        batches.append((token_rows, [[image] for image in images(rows, seed=step)]))
    return batches


def train_losses(model: nn.Module, batches) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for token_rows, row_images in batches:
        loss = model(batch_from(model, token_rows, row_images, labels=True), return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@functools.cache
def fp32_run() -> tuple[nn.Module, list[float]]:
    """The tiny LLaVA model cut to 2 decoder layers (each fp8 layer costs ~2 ms a step on CPU), its
    initial state and its fp32 losses."""
    config = tiny_model("llava").config
    config.text = dataclasses.replace(config.text, n_layers=2)
    torch.manual_seed(0)
    model = build_model(config)
    return copy.deepcopy(model), train_losses(model, chain_batches())


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_vlm_losses_track_fp32(recipe):
    initial, reference = fp32_run()
    # Every Linear with dims multiple of 16 except the lm_head and projector: text, vision and fusion.
    model = convert_to_float8(copy.deepcopy(initial), recipe=recipe, module_filter=float8_filter(min_features=16))
    assert sum(float8_recipe_of(m) == recipe for m in model.modules()) == 18
    losses = train_losses(model, chain_batches())
    assert reference[-1] < 0.6 * reference[0]  # it does learn
    deviation = [abs(a - b) / b for a, b in zip(losses, reference)]
    assert max(deviation) <= 0.03, (max(deviation), deviation.index(max(deviation)))
    assert max(deviation) > 0  # fp8 really changed the numerics


def fed(scaling: Float8Scaling, amax: float, *, record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast a tensor whose largest magnitude is `amax`."""
    tensor = torch.linspace(-0.5, 0.5, 32) * (1.0 if math.isfinite(amax) and amax != 0 else 0.0)
    tensor[3] = amax
    return scaling.cast(tensor, record=record)


def test_delayed_history_rolls_records_and_drives_the_scale():
    scaling = Float8Scaling(E4M3, history_len=4)
    fp8, inverse = fed(scaling, 2.0)  # nothing recorded yet: the first cast scales just in time
    assert float(fp8.float().abs().max() * inverse) == pytest.approx(2.0)
    assert float(inverse) == pytest.approx(2.0 / E4M3_MAX)
    assert scaling.amax_history.tolist() == [2.0, 0, 0, 0]
    for amax in (8.0, 1.0, 3.0):
        fed(scaling, amax)
    assert scaling.amax_history.tolist() == [3.0, 1.0, 8.0, 2.0]
    assert float(scaling.scale) == pytest.approx(E4M3_MAX / 8.0)  # the history's max, not the latest
    fp8, inverse = fed(scaling, 16.0)  # cast with the scale from before this step: saturates at 8
    assert float(fp8.float().abs().max() * inverse) == pytest.approx(8.0)
    assert scaling.amax_history.tolist() == [16.0, 3.0, 1.0, 8.0]  # the 2.0 left the window
    fed(scaling, 1.0)
    fed(scaling, 1.0)
    fed(scaling, 1.0)
    assert float(scaling.scale) == pytest.approx(E4M3_MAX / 16.0)
    fed(scaling, 1.0)  # 16 leaves the window too
    assert float(scaling.scale) == pytest.approx(E4M3_MAX / 1.0)
    fed(scaling, 50.0, record=False)  # eval-mode casts leave the state alone
    assert scaling.amax_history.tolist() == [1.0] * 4


def test_delayed_margin():
    scaling = Float8Scaling(E4M3, history_len=2, margin=2)
    fed(scaling, 4.0)
    assert float(scaling.scale) == pytest.approx(E4M3_MAX / (4.0 * 2**2))


@pytest.mark.parametrize("bad", [0.0, math.inf, math.nan])
def test_delayed_keeps_previous_scale_for_zero_inf_nan_amax(bad):
    scaling = Float8Scaling(E4M3, history_len=1)  # the history's max is exactly the latest amax
    fed(scaling, 2.0)
    good = float(scaling.scale)
    fp8, inverse = fed(scaling, bad)
    assert float(scaling.scale) == good
    assert math.isfinite(float(inverse))
    if not math.isnan(bad):  # zeros stay zeros and an inf saturates: the cast itself is finite
        assert torch.isfinite(fp8.float()).all()
    fp8, inverse = fed(scaling, 1.0)  # the next clean tensor is cast with the kept scale
    assert torch.isfinite(fp8.float() * inverse).all()
    assert float(inverse) == pytest.approx(1 / good)


def test_delayed_layer_records_input_weight_and_gradient_every_step():
    torch.manual_seed(0)
    layer = DelayedFloat8Linear.from_linear(nn.Linear(32, 16), history_len=8)
    for step in range(3):
        x = torch.randn(5, 32)
        y = layer(x.requires_grad_())
        (y * (step + 1)).sum().backward()
        assert float(layer.scaling_input.amax_history[0]) == pytest.approx(float(x.detach().abs().max()))
        assert float(layer.scaling_weight.amax_history[0]) == pytest.approx(float(layer.weight.abs().max()))
        assert float(layer.scaling_grad.amax_history[0]) == step + 1  # d(sum(y * c)) / dy = c
        assert int((layer.scaling_grad.amax_history > 0).sum()) == step + 1
    history = layer.scaling_input.amax_history.clone()
    layer.eval()
    assert torch.isfinite(layer(torch.zeros(2, 32))).all()
    assert torch.equal(layer.scaling_input.amax_history, history)
    assert set(layer.state_dict()) == {"weight", "bias"}  # checkpoints stay plain nn.Linear ones


def test_delayed_state_round_trips_through_the_plugin():
    plugin = Float8Precision("delayed", min_features=16)
    model = plugin.convert_module(tiny_model("llava"))
    model.train()
    train_losses(model, chain_batches(steps=2))
    state = plugin.state_dict()
    assert state["recipe"] == "delayed" and "text.layers.0.attention.wq.scaling_grad.amax_history" in state["scaling"]
    other = Float8Precision("delayed", min_features=16)
    other.convert_module(tiny_model("llava"))
    other.load_state_dict(state)
    assert other.state_dict()["scaling"].keys() == state["scaling"].keys()
    assert all(torch.equal(other.state_dict()["scaling"][k], v) for k, v in state["scaling"].items())
    fewer_layers = Float8Precision("delayed", min_features=64)
    fewer_layers.convert_module(tiny_model("llava"))
    with pytest.raises(ValueError, match="does not match the model"):
        fewer_layers.load_state_dict(state)
    Float8Precision("tensorwise").load_state_dict(state)  # another recipe: a warning, fresh scales


def test_default_filter_excludes_lm_head_projector_gates_and_small_layers():
    model = tiny_model("llava")  # text dim 64 (kv projections 32), vision width 32
    model.text.layers[0].router_gate = nn.Linear(64, 64)
    model.fusion.attention = nn.MultiheadAttention(64, 4)
    model.text.layers[1].odd = nn.Linear(64, 72)
    convert_to_float8(model, recipe="tensorwise")
    converted = {name for name, m in model.named_modules() if float8_recipe_of(m)}
    assert converted == {f"text.layers.{i}.{name}" for i in range(4)
                         for name in ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    # the excluded ones, for the record: lm_head, projector (64 wide), gate, MHA-owned, 72 % 16, 32-wide
    for name in ("text.output", "fusion.projector.2", "text.layers.0.router_gate", "fusion.attention.out_proj",
                 "text.layers.1.odd", "text.layers.0.attention.wk", "vision.model.blocks.0.mlp.fc1"):
        assert type(model.get_submodule(name)) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear), name


def test_conversion_is_idempotent_and_refuses_another_recipe():
    model = convert_to_float8(tiny_model("llava"), recipe="delayed", module_filter=float8_filter(min_features=16))
    layers = {name: m for name, m in model.named_modules() if float8_recipe_of(m)}
    convert_to_float8(model, recipe="delayed", module_filter=float8_filter(min_features=16))
    assert {name: m for name, m in model.named_modules() if float8_recipe_of(m)} == layers
    with pytest.raises(ValueError, match="already fp8 with recipe 'delayed'"):
        convert_to_float8(model, recipe="tensorwise")
    with pytest.raises(ValueError, match="unknown fp8 recipe"):
        convert_to_float8(model, recipe="mxfp8")


def test_vlm_fit_one_step_with_the_fp8_yaml(tmp_path, shapes_dir):
    from vlm.training.cli import VLMCLI

    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=1, every=1)
    args = fit_args(recipe, "llava", "--config", str(ROOT / "configs" / "precision" / "fp8.yaml"),
                    "--trainer.plugins.init_args.recipe", "delayed", "--trainer.limit_val_batches", "0")
    cli = VLMCLI(args=args)
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, Float8Precision) and plugin.recipe == "delayed"
    assert sum(float8_recipe_of(m) == "delayed" for m in cli.model.modules()) == 10  # wq wo w1 w2 w3 x 2 layers
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 1 and math.isfinite(float(losses[0]))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("scaling" in key for key in checkpoint["state_dict"])  # loads into a plain model
    assert "model.text.layers.0.attention.wq.scaling_input.amax_history" in checkpoint["Float8Precision"]["scaling"]


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_convert_before_fully_shard_then_lightnings_late_call_is_a_no_op(recipe):
    """The FSDP2 order, in one gloo process: convert, fully_shard, and Lightning's convert_module later."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    batch = batch_from(tiny_model("llava"), [[IMAGE_ID, 7, 8, 9, 10]], [images(1)], labels=True)
    plain = Float8Precision(recipe, min_features=16).convert_module(tiny_model("llava").train())
    expected = plain(batch, return_logits=False).loss
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plugin = Float8Precision(recipe, min_features=16)
        model = plugin.convert_module(tiny_model("llava").train())
        for layer in model.text.layers:
            fully_shard(layer)
        fully_shard(model)
        assert plugin.convert_module(model) is model
        assert isinstance(model.text.layers[0].attention.wq.weight, DTensor)
        loss = model(batch, return_logits=False).loss
        loss.backward()
        assert torch.equal(loss.detach(), expected.detach())
        with pytest.raises(RuntimeError, match="before fully_shard"):
            Float8Precision(recipe).convert_module(fully_shard(tiny_model("llava")))
    finally:
        dist.destroy_process_group()
