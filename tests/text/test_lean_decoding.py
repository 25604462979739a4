"""Decoding with grouped-query attention over the cache in place: the one-token step equals the
repeated-cache reference, and greedy tokens equal transformers' generate under every RoPE scaling
(prompts past the original length, so dynamic NTK rescales while decoding)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from vlm.checkpoints import load_llama
from vlm.generation import generate
from vlm.text.llama import Llama, LlamaConfig

SCALINGS = {
    "none": None,
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
}


def reference_attention(attention, x, ctx):
    """The attention with the kv heads repeated for every query head (transformers' repeat_kv)."""
    B, T, _ = x.shape
    q = attention.wq(x).view(B, T, -1, attention.head_dim).transpose(1, 2)
    k = attention.wk(x).view(B, T, -1, attention.head_dim).transpose(1, 2)
    v = attention.wv(x).view(B, T, -1, attention.head_dim).transpose(1, 2)
    from vlm.text.rope import apply_rope

    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    layer = ctx.cache.layers[attention.layer_idx]
    k = torch.cat([layer.k[:, :, : ctx.start], k], 2).repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = torch.cat([layer.v[:, :, : ctx.start], v], 2).repeat_interleave(q.shape[1] // v.shape[1], 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
    return attention.wo(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("padded", [False, True])
def test_one_token_step_equals_repeated_cache(padded):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=50, hidden_dim=96)).eval()
    mask = torch.ones(2, 30, dtype=torch.long)
    if padded:
        mask[1, :7] = 0  # left padding: the step's mask is [B, 1, 1, S]
    cache = model.new_cache(2, 40)
    with torch.no_grad():
        model.hidden(torch.randint(0, 50, (2, 30)), attention_mask=mask, cache=cache)
        ctx = model.context(1, attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)
        x = torch.randn(2, 1, 64)
        expected = reference_attention(model.layers[0].attention, x, ctx)
        got = model.layers[0].attention(x, ctx)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_greedy_equals_transformers_past_the_trained_length(tmp_path, name):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=48, rope_scaling=SCALINGS[name],
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)  # sharper distributions: greedy choices far from ties
    hf.save_pretrained(tmp_path)
    ours = load_llama(tmp_path).eval()
    prompt = torch.randint(0, 101, (1, 60), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generate(ours, prompt.tolist(), max_new_tokens=24)[0] == ref[0, 60:].tolist()


@pytest.mark.parametrize("scaling", [None, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                     {"type": "dynamic", "factor": 2.0}])
def test_rope_table_rows_equal_computed_tables(scaling):
    """Gathered rows of the position table are bit-identical to cos/sin computed for the positions,
    also after the table grows; dynamic scaling computes per call (its frequencies follow the length)."""
    from vlm.text.rope import RotaryTables, rope_scaling_from_dict

    tables = RotaryTables(32, 10000.0, rope_scaling_from_dict(scaling), max_seq_len=64)
    for limit in (40, 41, 300):  # grows at 41 (to 80) and at 300
        positions = torch.randint(0, limit, (2, 17), generator=torch.Generator().manual_seed(limit))
        for dtype in (torch.float32, torch.bfloat16):
            direct = tables(positions, dtype)
            gathered = tables(positions, dtype, limit=limit)
            assert all(torch.equal(a, b) for a, b in zip(direct, gathered))
    if scaling is None or scaling["type"] != "dynamic":
        assert tables._table[0].shape[0] == 300
    else:
        assert tables._table is None
