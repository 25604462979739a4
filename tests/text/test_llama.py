"""Our Llama against transformers' LlamaForCausalLM: same weights -> same logits (fp32)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from vlm.checkpoints import load_llama, save_llama_hf, save_llama_meta
from vlm.text.llama import Llama, LlamaConfig

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama31": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
    ),
    # Meta's params.json cannot hold original_max_position_embeddings: llama-models fix it at 8192.
    "llama31_meta": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
}


def make_hf(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, vocab_size=211, max_position_embeddings=256,
        rms_norm_eps=1e-5, **CONFIGS[name]
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a mis-mapped norm cannot pass
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def kl(ref_logits, logits):
    return F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_parity(tmp_path, name):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    ours = load_llama(tmp_path).eval()
    ids = torch.randint(0, 211, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert kl(ref.flatten(0, 1), got.flatten(0, 1)) < 1e-6


@pytest.mark.parametrize("name", ["gqa4", "tied", "llama31"])
def test_export_round_trip(tmp_path, name):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path / "src")
    ours = load_llama(tmp_path / "src").eval()
    save_llama_hf(ours, tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 211, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_sharded_hf_checkpoint(tmp_path):
    hf = make_hf("gqa4")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_llama(tmp_path).eval()
    ids = torch.randint(0, 211, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def meta_permute_from_hf(w, n_heads):
    """Independent inverse of the published Meta->HF permutation: HF rows [h, half, j] -> Meta [h, j, pair]."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    w = w.reshape(n_heads, 2, hd // 2, in_dim)  # [head, half, j]
    return torch.stack((w[:, 0], w[:, 1]), dim=2).reshape(out_dim, in_dim)  # interleave halves


def test_meta_layout_same_logits(tmp_path):
    hf = make_hf("llama31_meta")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_llama(tmp_path / "hf").eval()
    save_llama_meta(ours, tmp_path / "meta")
    # The saved q/k rows must be Meta's interleaved layout, checked with an independent permutation.
    saved = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    expected_q = meta_permute_from_hf(hf.model.layers[0].self_attn.q_proj.weight.detach(), 4)
    torch.testing.assert_close(saved["layers.0.attention.wq.weight"], expected_q, atol=0, rtol=0)
    meta = load_llama(tmp_path / "meta").eval()
    ids = torch.randint(0, 211, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(meta(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    short_context = load_llama(tmp_path / "hf").eval()
    short_context.config.rope_scaling.original_max_position_embeddings = 32
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        save_llama_meta(short_context, tmp_path / "meta2")


def test_meta_sharded_params_rule(tmp_path):
    """Two model-parallel shards and the params.json FFN rule (multiple_of, ffn_dim_multiplier)."""
    import json

    cfg = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=256)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    save_llama_meta(model, tmp_path / "one")
    full = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    cat_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}
    shards = [{}, {}]
    for k, v in full.items():
        kind = k.split(".")[-2]
        if v.ndim == 1:
            shards[0][k] = shards[1][k] = v
        else:
            a, b = v.chunk(2, dim=cat_dim[kind])
            shards[0][k], shards[1][k] = a.clone(), b.clone()
    (tmp_path / "two").mkdir()
    for i, s in enumerate(shards):
        torch.save(s, tmp_path / "two" / f"consolidated.{i:02d}.pth")
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 64,
              "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5}  # 2*256/3=170 -> *1.5=255 -> round up to 256
    (tmp_path / "two" / "params.json").write_text(json.dumps(params))
    loaded = load_llama(tmp_path / "two").eval()
    assert loaded.config.hidden_dim == 256 and loaded.config.vocab_size == 50
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=1e-6)


def test_mismatched_and_missing_tensors_are_named(tmp_path):
    hf = make_hf("mha")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_llama(tmp_path)
    msg = str(err.value)
    assert "layers.1.feed_forward.w3.weight" in msg and "(7, 64)" in msg and "(160, 64)" in msg
    assert "missing tensor norm.weight" in msg


def test_left_padding_matches_unpadded():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128)).eval()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        torch.testing.assert_close(batched[0], model(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1, 4:], model(b)[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=97, hidden_dim=128)).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
        parts += [model(ids[:, i : i + 1], cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="overflow"):
        model(ids[:, :5], cache=cache)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown LlamaConfig keys"):
        LlamaConfig.from_dict({"dim": 64, "n_head": 4})
    with pytest.raises(ValueError, match="low_freq_factor"):
        LlamaConfig(rope_scaling={"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0})


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_loss_matches_plain_cross_entropy(eps):
    from vlm.text.loss import fused_linear_cross_entropy

    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128))
    ids = torch.randint(0, 97, (3, 17))
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    labels[2, 10:] = -100  # padding
    loss = model.loss(ids, labels, label_smoothing=eps)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(ids)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=eps)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    # Small chunks give the same value; all-ignored labels give 0 and zero gradients.
    h = torch.randn(10, 64, requires_grad=True)
    w = torch.randn(97, 64, requires_grad=True)
    y = torch.randint(0, 97, (10,))
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, y, chunk_size=3), F.cross_entropy(h @ w.T, y))
    doubled = torch.autograd.grad(2 * fused_linear_cross_entropy(h, w, y, chunk_size=4), [h, w])
    single = torch.autograd.grad(fused_linear_cross_entropy(h, w, y, chunk_size=4), [h, w])
    torch.testing.assert_close(doubled[0], 2 * single[0])
    torch.testing.assert_close(doubled[1], 2 * single[1])
    empty = fused_linear_cross_entropy(h, w, torch.full((10,), -100))
    empty.backward()
    assert empty.item() == 0 and h.grad.abs().sum() == 0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_loss_under_bf16_autocast_matches_autocast_reference(eps):
    from vlm.text.loss import fused_linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(12, 32, requires_grad=True)
    w = (torch.randn(50, 32) * 0.1).requires_grad_()
    y = torch.randint(0, 50, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=5, label_smoothing=eps)
        ref = F.cross_entropy((h @ w.T).float(), y, label_smoothing=eps)
    gh, gw = torch.autograd.grad(loss, [h, w])
    rh, rw = torch.autograd.grad(ref, [h, w])
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)  # bf16 matmuls on both sides
    torch.testing.assert_close(gh, rh, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw, rw, atol=2e-3, rtol=2e-2)
