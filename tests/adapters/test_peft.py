"""The PEFT layout: our text adapters exported and loaded by `peft` onto a transformers Llama give
our logits, and adapters that `peft` saved load onto ours with its logits (fp32, 1e-5)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import tiny_model
from vlm.adapters import LoRAConfig, apply_lora, load_peft_adapter, lora_modules, save_peft_adapter
from vlm.checkpoints import save_llama_hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(6, 64, (2, 13), generator=torch.Generator().manual_seed(0))  # no <|image|>


def hf_base(path):
    """The tiny model's text backbone exported with vlm.checkpoints and read back by transformers."""
    model = tiny_model("llava")
    save_llama_hf(model.text, path)
    return model, transformers.LlamaForCausalLM.from_pretrained(path).eval()


CASES = {
    "all": dict(targets=["*.attention.*", "*.feed_forward.*"]),
    "dora": dict(targets=["*.attention.wq", "*.attention.wk", "*.feed_forward.w2"], use_dora=True),
    "some_layers": dict(targets=["*.layers.1.attention.wq", "*.layers.[23].attention.wk", "text.output"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_loads_in_peft(tmp_path, case, randomise):
    model, hf = hf_base(tmp_path / "base")
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, **CASES[case]))
    randomise(model)
    model.eval()
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    if case == "all":
        assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(
            tmp_path / "adapter" / "adapter_model.safetensors")
    if case == "some_layers":
        assert config["target_modules"] == ["lm_head", "model.layers.1.self_attn.q_proj",
                                            "model.layers.2.self_attn.k_proj", "model.layers.3.self_attn.k_proj"]
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(IDS).logits, model.text(IDS), atol=1e-5, rtol=1e-5)
    # And back: a fresh model with the file's adapters computes what the saved one did.
    fresh = tiny_model("llava")
    names = load_peft_adapter(fresh, tmp_path / "adapter")
    assert names == sorted(lora_modules(model))
    with torch.no_grad():
        assert torch.equal(fresh.text(IDS), model.text(IDS))


def test_peft_saved_adapter_loads_onto_ours(tmp_path):
    model, hf = hf_base(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    theirs = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.eval().save_pretrained(tmp_path / "peft")
    names = load_peft_adapter(model, tmp_path / "peft")
    assert len(names) == 3 * model.config.text.n_layers
    with torch.no_grad():
        torch.testing.assert_close(model.text(IDS), theirs(IDS).logits, atol=1e-5, rtol=1e-5)
    save_peft_adapter(model, tmp_path / "ours")
    original, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_peft_layout_errors(tmp_path):
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="the text backbone has no LoRA adapter"):
        save_peft_adapter(model, tmp_path / "a")
    apply_lora(model, LoRAConfig(parts=["text", "fusion"], targets=["*.attention.wq", "fusion.*"]))
    with pytest.raises(ValueError, match="PEFT's Llama layout holds the text backbone only, but fusion.projector.0"):
        save_peft_adapter(model, tmp_path / "a")
    save_peft_adapter(model, tmp_path / "a", ignore_non_text=True)
    other = tiny_model("llava")
    apply_lora(other, LoRAConfig(rank=2, targets=["*.attention.wq"]))
    with pytest.raises(ValueError, match="text.layers.0.attention.wq already has an adapter of rank 2"):
        load_peft_adapter(other, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_rslora": True}))
    with pytest.raises(ValueError, match="use_rslora=True is not supported"):
        load_peft_adapter(tiny_model("llava"), tmp_path / "a")
