"""QLoRA: NF4 base weights (torchao) within the derived error bound, and a QLoRA forward equal to
the LoRA forward on the dequantised weights; merging dequantises."""

import pytest
import torch
from torch import nn

from tiny_models import tiny_model
from vlm.adapters import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, load_adapter_state_dict, merge_lora
from vlm.adapters.nf4 import dequantize, is_nf4, nf4_error_bound, quantize_nf4

torchao_quantization = pytest.importorskip("torchao.quantization")


def test_nf4_round_trip_within_bound():
    torch.manual_seed(0)
    weight = torch.randn(128, 256) * 0.02
    weight[3, 7] = 0.5  # an outlier block: the int8 scale of its group is then coarse
    nf4 = quantize_nf4(weight)
    assert is_nf4(nf4) and nf4.shape == weight.shape and nf4.dtype == weight.dtype
    # Double quantisation: one int8 scale per block of 64, one float factor per 256 scales.
    assert nf4.quantized_scalers.dtype == torch.int8 and nf4.quantized_scalers.numel() == weight.numel() // 64
    assert nf4.quantization_factor.numel() == weight.numel() // 64 // 256
    # Our dequantisation is torchao's own, at torchao's default block sizes for this shape.
    assert torch.equal(dequantize(nf4), torchao_quantization.to_nf4(weight).get_original_weight())
    error, bound = (dequantize(nf4) - weight).abs(), nf4_error_bound(weight)
    assert (error <= bound + 1e-7).all()
    assert (error / bound).max() > 0.9  # the bound is reached (the clamped int8 scale), not loose


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_forward_equals_lora_on_dequantised_weights(use_dora, randomise):
    config = LoRAConfig(rank=4, use_dora=use_dora, targets=["*.attention.*", "*.feed_forward.*"])
    qlora = tiny_model("llava")
    names = apply_lora(qlora, config.__class__(**{**config.to_dict(), "quantize_base": "nf4"}))
    randomise(qlora)
    lora = tiny_model("llava")
    apply_lora(lora, config)
    with torch.no_grad():
        for name in names:
            assert is_nf4(qlora.get_submodule(name).base.weight)
            lora.get_submodule(name).base.weight.copy_(dequantize(qlora.get_submodule(name).base.weight))
    load_adapter_state_dict(lora, adapter_state_dict(qlora))
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = lora.text(ids)
    got = qlora.text(ids)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    got.square().mean().backward()  # trains on CPU: gradients reach the adapters only
    assert all(qlora.get_submodule(n).lora_A.grad is not None for n in names)
    assert all(qlora.get_submodule(n).base.weight.grad is None for n in names)
    with torch.no_grad():
        merged = merge_lora(qlora).text(ids)
    assert not any(is_nf4(t) for t in qlora.state_dict().values())
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_qlora_computes_in_the_input_dtype():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(64, 32, bias=True), rank=4, alpha=8, quantize_base="nf4")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    # torchao dequantises straight to bf16 (levels times scales in bf16), so compare with that.
    reference = x @ lora.base.weight.to(torch.bfloat16).t() + lora.bias.to(torch.bfloat16)
    torch.testing.assert_close(y, reference, atol=0, rtol=0)
    exact = x.float() @ dequantize(lora.base.weight).t() + lora.bias
    torch.testing.assert_close(y.float(), exact, atol=0.05, rtol=0.02)


def test_nf4_needs_whole_blocks():
    model = nn.Module()
    model.text = nn.Sequential(nn.Linear(10, 3))
    with pytest.raises(ValueError, match=r"^LoRAConfig.quantize_base: text.0 has 30 weights"):
        apply_lora(model, LoRAConfig(targets=["text.*"], quantize_base="nf4"))
    assert isinstance(model.text[0], nn.Linear)
