"""Mixtral checkpoints: transformers' MixtralForCausalLM, both of its file layouts, against our MoE
Llama (same weights -> same logits, fp32), and our export read back by both."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from vlm.checkpoints import load_llama, save_llama_hf
from vlm.checkpoints.mixtral import mixtral_differences
from vlm.text.llama import Llama, LlamaConfig
from vlm.text.moe import MoEConfig, switch_loss

VOCAB = 211


def make_hf(seed: int = 0, **options):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, **options)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1 so that a mis-mapped norm cannot pass
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:  # decisive routing: a swapped expert changes the logits
                p.normal_(0, 0.5)
    return model


def kl(ref_logits, logits):
    return F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean")


IDS = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_logits_match_transformers_mixtral(tmp_path, layout):
    hf = make_hf()
    hf.save_pretrained(tmp_path, save_original_format=layout == "per_expert")
    names = set(load_file(tmp_path / "model.safetensors"))
    marker = "block_sparse_moe.experts.3.w2.weight" if layout == "per_expert" else "mlp.experts.gate_up_proj"
    assert any(name.endswith(marker) for name in names), sorted(names)[:8]
    ours = load_llama(tmp_path).eval()
    assert ours.config.moe.num_experts == 4 and ours.config.moe.top_k == 2 and ours.config.rope_theta == 1e6
    with torch.no_grad():
        ref, got = hf(IDS).logits, ours(IDS)
    assert kl(ref, got) < 1e-6
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_export_round_trip_is_exact(tmp_path):
    hf = make_hf(seed=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_llama(tmp_path / "hf")
    save_llama_hf(ours, tmp_path / "ours")
    original, written = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(original) == set(written)
    assert all(torch.equal(original[k], written[k]) for k in original)
    again = load_llama(tmp_path / "ours")
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.router_aux_loss_coef == pytest.approx(hf.config.router_aux_loss_coef)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, hf(IDS).logits)


def test_switch_loss_is_mixtral_loss_over_k():
    """transformers counts each of the k choices of a token: k times our loss at one layer."""
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    scores = logits.softmax(-1)
    counts = torch.bincount(scores.topk(2, dim=-1).indices.reshape(-1), minlength=4)
    theirs = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(2 * switch_loss(scores, counts, 2), theirs, atol=1e-6, rtol=1e-6)


def test_moe_mixtral_cannot_hold_round_trips_as_vlm_moe(tmp_path):
    """Shared expert, bias balancing, a dense first layer, a capacity: written with Mixtral's names
    plus our extras under model_type vlm_moe, read back exactly, refused by transformers."""
    moe = {"num_experts": 4, "top_k": 2, "balance": "bias", "shared_experts": 1, "first_dense_layers": 1,
           "capacity_factor": 1.25, "z_loss_coef": 1e-3}
    config = LlamaConfig(dim=32, n_layers=3, n_heads=4, vocab_size=64, hidden_dim=48, moe=moe)
    model = Llama(config)
    with torch.no_grad():
        model.layers[1].feed_forward.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.2]))
    save_llama_hf(model, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.block_sparse_moe.expert_bias",
            "model.layers.2.block_sparse_moe.shared_expert.down_proj.weight",
            "model.layers.2.block_sparse_moe.experts.3.w3.weight"} <= names
    again = load_llama(tmp_path)
    assert again.config == config
    assert set(again.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises((ValueError, KeyError)):
        transformers.AutoConfig.from_pretrained(tmp_path)


def test_mixtral_differences_name_each_key():
    moe = MoEConfig(score="sigmoid", balance="bias", expert_hidden_dim=16)
    assert mixtral_differences(moe, hidden_dim=48) == [
        "score 'sigmoid' (Mixtral: 'softmax')", "expert_hidden_dim 16 (Mixtral: 48)",
        "balance 'bias' (Mixtral has no selection bias)"]
    assert mixtral_differences(MoEConfig(expert_hidden_dim=48), hidden_dim=48) == []


def test_a_missing_expert_is_named(tmp_path):
    from safetensors.torch import save_file

    make_hf().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer 1 w3: experts \[2\] missing"):
        load_llama(tmp_path)


def test_meta_layout_refuses_moe(tmp_path):
    from vlm.checkpoints import save_llama_meta
    from vlm.errors import UserError

    with pytest.raises(UserError, match="Meta's layout has no Mixture-of-Experts"):
        save_llama_meta(Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=16, hidden_dim=32,
                                          moe=MoEConfig(num_experts=2, top_k=1))), tmp_path)
    assert not list(tmp_path.iterdir())
