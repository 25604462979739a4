"""LoRA / DoRA: a fresh adapter is its base, training moves only the adapters, merging keeps the
logits (both fusions), disabled adapters give the base's logits, configs and targets fail in one
line naming the field."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny_models import IMAGE_ID, batch_from, images, open_gates, tiny_model
from vlm.adapters import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter_state_dict,
    lora_modules,
    lora_parameters,
    merge_lora,
)
from vlm.text.llama import Llama, LlamaConfig


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fresh_adapter_equals_base(use_dora, bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=bias)
    x = torch.randn(3, 5, 24)
    expected = base(x)
    lora = LoRALinear(base, rank=4, alpha=8, use_dora=use_dora)
    assert lora.lora_A.abs().sum() > 0 and lora.lora_B.abs().sum() == 0
    assert not any(p.requires_grad for p in lora.base.parameters())
    if use_dora:  # x W^T then the bias: not one fused addmm, so equal to rounding
        torch.testing.assert_close(lora(x), expected, atol=1e-6, rtol=0)
    else:
        assert torch.equal(lora(x), expected)
    torch.testing.assert_close(lora.weight, base.weight, atol=1e-7, rtol=0)


def test_one_step_moves_only_the_adapters(randomise):
    model = tiny_model("llava").train()
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}  # the vision tower
    names = apply_lora(model, LoRAConfig(rank=4, targets=["*.attention.wq", "*.attention.wv", "*.feed_forward.w2"]))
    assert len(names) == 3 * model.config.text.n_layers
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == frozen_before | {f"{n}.base.weight" for n in names}  # apply_lora freezes the bases only
    randomise(model)  # with B = 0 the gradient of A is zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    batch = batch_from(model, [[1, IMAGE_ID, 7, 8, 9, 10]], [images(1)], labels=True)
    model(batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.lora_{m}" for n in names for m in "AB"}
    assert all(model.get_submodule(n).base.weight.grad is None for n in names)


@pytest.mark.parametrize("fusion,use_dora", [("llava", False), ("flamingo", True)])
def test_merged_logits_equal_adapted(fusion, use_dora, randomise):
    model = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(model, 0.5)
    plain_keys = set(model.state_dict())
    config = LoRAConfig(rank=4, alpha=8, use_dora=use_dora, parts=["text", "vision", "fusion"],
                        targets=["text.layers.*", "text.output", "vision.*.qkv", "fusion.*"])
    names = apply_lora(model, config)
    assert "text.output" in names and any(n.startswith("fusion.") for n in names)
    randomise(model)
    batch = batch_from(model, [[1, IMAGE_ID, 7, 8, 9], [2, 3, IMAGE_ID, 4, 11]], [images(1), images(1, seed=1)],
                       labels=True)
    with torch.no_grad():
        adapted = model(batch)
        # The fused loss reads text.output.weight itself: the adapter's effective weight.
        reference = F.cross_entropy(adapted.logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
        torch.testing.assert_close(adapted.loss, reference, atol=1e-5, rtol=1e-5)
        merged = merge_lora(model)(batch)
    assert merged is not None and not lora_modules(model)
    assert set(model.state_dict()) == plain_keys
    torch.testing.assert_close(merged.logits, adapted.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.loss, adapted.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion,use_dora,quantize", [("llava", False, None), ("flamingo", True, None),
                                                      ("llava", False, "nf4")])
def test_disabled_adapters_compute_the_base_model(fusion, use_dora, quantize, randomise):
    """Inside `adapters_disabled` the adapted model (adapters trained away from zero, on linears with
    and without bias, the fused head included) gives the un-adapted model's logits and loss; on
    exit the adapters count again, and a graph built before the block still back-propagates."""
    from vlm.adapters.nf4 import dequantize

    model = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(model, 0.5)
    config = LoRAConfig(rank=4, alpha=8, use_dora=use_dora, quantize_base=quantize, parts=["text", "vision", "fusion"],
                        targets=["text.layers.*", "vision.*.qkv", "fusion.*"] + ([] if quantize else ["text.output"]))
    base = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(base, 0.5)
    apply_lora(model, config)
    randomise(model)
    if quantize:  # the base of comparison: the same NF4-rounded weights, dense
        with torch.no_grad():
            for name, module in lora_modules(model).items():
                base.get_submodule(name).weight.copy_(dequantize(module.base.weight))
    batch = batch_from(model, [[1, IMAGE_ID, 7, 8, 9], [2, 3, IMAGE_ID, 4, 11]], [images(1), images(1, seed=1)],
                       labels=True)
    adapted = model(batch)
    with torch.no_grad():
        expected = base(batch)
        with adapters_disabled(model) as same:
            disabled = same(batch)
        after = model(batch)
    torch.testing.assert_close(disabled.logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(disabled.loss, expected.loss, atol=1e-6, rtol=0)
    assert (adapted.logits - expected.logits).abs().max() > 1e-2  # the adapters matter
    assert torch.equal(after.logits, adapted.logits.detach()) and all(m.enabled for m in lora_modules(model).values())
    adapted.loss.backward()
    assert all(m.lora_B.grad is not None for n, m in lora_modules(model).items() if n.startswith("text."))


def test_adapter_state_dict_round_trip(randomise):
    model = tiny_model("llava")
    names = apply_lora(model, LoRAConfig(rank=2, use_dora=True, targets=["*.attention.wq"]))
    randomise(model)
    state = adapter_state_dict(model)
    assert set(state) == {f"{n}.{t}" for n in names for t in ("lora_A", "lora_B", "magnitude")}
    other = tiny_model("llava")
    apply_lora(other, LoRAConfig(rank=2, use_dora=True, targets=["*.attention.wq"]))
    load_adapter_state_dict(other, state)
    assert not any(m.training for m in lora_modules(other).values())  # the eval model stays in eval mode
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(other.text(ids), model.text(ids))
    with pytest.raises(ValueError, match="missing text.layers.0.attention.wq.lora_A"):
        load_adapter_state_dict(other, {k: v for k, v in state.items() if k != "text.layers.0.attention.wq.lora_A"})


CONFIG_ERRORS = [
    (dict(rank=0), "rank"),
    (dict(rank=2.0), "rank"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(targets="*.attention.wq"), "targets"),
    (dict(targets=[]), "targets"),
    (dict(parts=["audio"]), "parts"),
    (dict(parts=["text", "text"]), "parts"),
    (dict(use_dora="yes"), "use_dora"),
    (dict(quantize_base="int4"), "quantize_base"),
]


@pytest.mark.parametrize("values,field", CONFIG_ERRORS, ids=[f for _, f in CONFIG_ERRORS])
def test_bad_config_is_one_line_naming_the_field(values, field):
    with pytest.raises(ValueError) as error:
        LoRAConfig(**values)
    assert str(error.value).startswith(f"LoRAConfig.{field} ") and "\n" not in str(error.value)


def test_bad_targets_and_parts():
    with pytest.raises(ValueError, match=r"unknown LoRAConfig keys \['rnak'\]"):
        LoRAConfig.from_dict({"rnak": 4})
    model = tiny_model("llava")
    no_match = r"^LoRAConfig.targets: '\*.attention.wz' matches no nn.Linear in parts \['text'\]"
    with pytest.raises(ValueError, match=no_match):
        apply_lora(model, LoRAConfig(targets=["*.attention.wq", "*.attention.wz"]))
    assert not lora_modules(model)  # nothing half-applied
    with pytest.raises(ValueError, match="^LoRAConfig.parts: the model has no submodule 'text'"):
        apply_lora(model.vision, LoRAConfig())
    apply_lora(model, LoRAConfig(targets=["*.attention.wq"]))
    with pytest.raises(ValueError, match="text.layers.0.attention.wq already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(targets=["*.attention.*"]))
    tied = nn.Module()
    tied.text = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, hidden_dim=64, tie_embeddings=True))
    with pytest.raises(ValueError, match="text.output: its weight is shared with text.tok_embeddings"):
        apply_lora(tied, LoRAConfig(targets=["text.output"]))
