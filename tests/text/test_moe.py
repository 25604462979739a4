"""The MoE feed-forward against a naive per-token loop, the Switch loss by hand, bias balancing,
the one-expert case against a dense SwiGLU, and cached generation with an MoE backbone."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import vlm.text.moe as moe_module
from vlm.model import ModelInput, build_model
from vlm.text.llama import FeedForward, Llama, LlamaConfig
from vlm.text.moe import MoEConfig, MoEFeedForward, moe_statistics, pop_aux_loss, switch_loss, update_expert_biases

DIM, HIDDEN = 16, 24


def make_layer(seed: int = 0, *, shared: bool = False, **options) -> MoEFeedForward:
    torch.manual_seed(seed)
    config = MoEConfig(**{"num_experts": 4, "top_k": 2, "balance": "none", **options})
    layer = MoEFeedForward(DIM, config, hidden_dim=HIDDEN, shared=FeedForward(DIM, HIDDEN) if shared else None)
    with torch.no_grad():
        layer.gate.weight.normal_(0, 1.0)  # decisive routing: no near-ties between experts
        layer.experts.reset_parameters(0.2)
    return layer


def expert_output(layer: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    w = layer.experts
    return F.linear(F.silu(F.linear(x, w.w1[e])) * F.linear(x, w.w3[e]), w.w2[e])


def naive(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """One token (and one assignment) at a time, straight from the routing rules."""
    c, flat = layer.config, x.reshape(-1, x.shape[-1])
    n, e = flat.shape[0], c.num_experts
    logits = layer.gate(flat).float()
    scores = logits.softmax(-1) if c.score == "softmax" else logits.sigmoid()
    out = [torch.zeros(flat.shape[-1]) for _ in range(n)]
    if c.router == "expert_choice":
        capacity = min(n, math.ceil((c.capacity_factor or c.top_k) * n / e))
        for expert in range(e):
            for token in scores[:, expert].topk(capacity).indices.tolist():
                out[token] = out[token] + scores[token, expert] * expert_output(layer, expert, flat[token])
    else:
        capacity = math.ceil(c.capacity_factor * c.top_k * n / e) if c.capacity_factor else n * c.top_k
        chosen = scores.topk(c.top_k, dim=-1).indices
        used = [0] * e
        for k in range(c.top_k):  # first choices before second choices, then token order
            for token in range(n):
                expert = int(chosen[token, k])
                weight = scores[token, expert] / (scores[token, chosen[token]].sum() if c.renormalize else 1)
                if used[expert] < capacity:
                    out[token] = out[token] + weight * expert_output(layer, expert, flat[token])
                used[expert] += 1
    y = torch.stack(out).view_as(x)
    return y + layer.shared(x) if layer.shared is not None else y


CASES = {
    "token_choice": dict(),
    "token_choice_sigmoid_shared": dict(score="sigmoid", shared=True),
    "token_choice_capacity": dict(capacity_factor=0.5),
    "token_choice_top1_capacity": dict(top_k=1, capacity_factor=1.0, renormalize=False),
    "expert_choice": dict(router="expert_choice"),
    "expert_choice_capacity": dict(router="expert_choice", capacity_factor=0.5),
}


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_matches_naive_loop(monkeypatch, case, grouped):
    if grouped and not moe_module.grouped_mm_supported("cpu", torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda *_: grouped)
    layer = make_layer(**CASES[case])
    x = torch.randn(3, 8, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    probe = torch.randn(3, 8, DIM, generator=torch.Generator().manual_seed(2))
    got = layer(x)
    grads = torch.autograd.grad((got * probe).sum(), [x, *layer.parameters()])
    ref = naive(layer, x)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    if "capacity" in case:  # some tokens lost every assignment: they contribute exactly nothing
        assert float(layer.last_dropped) > 0
        silent = (got.detach().reshape(-1, DIM) == 0).all(-1)
        assert silent.any(), "the case should drop at least one token entirely"


def test_switch_aux_loss_hand_computed():
    """Two experts, top-1. Scores [.75, .25], [.75, .25], [.25, .75]: loads (2, 1), mean scores
    (1.75/3, 1.25/3); loss = E / (k N) * sum load * P = 2/3 * (3.5 + 1.25) / 3 = 9.5 / 9."""
    layer = MoEFeedForward(2, MoEConfig(num_experts=2, top_k=1, aux_loss_coef=0.01, z_loss_coef=0.1), hidden_dim=4)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(2))
    ln3 = math.log(3)
    layer(torch.tensor([[[ln3, 0.0], [ln3, 0.0], [0.0, ln3]]]))
    assert layer.last_load.tolist() == [2, 1]
    z = math.log(4) ** 2  # logsumexp of (ln 3, 0) is ln 4, for every token
    aux = pop_aux_loss(layer)
    assert aux.requires_grad
    assert aux.item() == pytest.approx(0.01 * 9.5 / 9 + 0.1 * z, rel=1e-6)
    assert pop_aux_loss(layer) is None  # collected once
    uniform = torch.full((6, 3), 1 / 3)
    assert switch_loss(uniform, torch.tensor([4, 4, 4]), 2).item() == pytest.approx(1.0)


def test_bias_update_moves_load_toward_uniform():
    torch.manual_seed(0)
    layer = MoEFeedForward(DIM, MoEConfig(num_experts=4, top_k=1, balance="bias", bias_update_rate=0.005), hidden_dim=8)
    with torch.no_grad():
        layer.gate.weight[0].fill_(0.1)  # skewed: tokens with a positive mean favour expert 0
    x = torch.randn(256, DIM) + 0.5
    layer.train()
    layer(x)
    before = layer.last_load.max().item() / 64
    for _ in range(150):
        layer(x)
        update_expert_biases(layer)
    after = layer.last_load.max().item() / 64
    assert before > 2.5 and after < 1.1, (before, after)  # max load / mean load
    assert layer.expert_bias.sum().abs() < 1e-5  # centred updates
    assert "expert_bias" in layer.state_dict()  # saved with the checkpoint
    layer.eval()
    layer(x)
    assert layer.pending_load is None  # evaluation routes without counting toward the next update


def test_one_expert_top1_is_a_dense_swiglu():
    torch.manual_seed(0)
    dense = FeedForward(DIM, HIDDEN)
    for score in ("softmax", "sigmoid"):
        layer = MoEFeedForward(DIM, MoEConfig(num_experts=1, top_k=1, score=score), hidden_dim=HIDDEN)
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                getattr(layer.experts, name)[0].copy_(getattr(dense, name).weight)
        x = torch.randn(2, 5, DIM)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-6)


def moe_text(**options) -> LlamaConfig:
    moe = {"num_experts": 4, "top_k": 2, **options}
    return LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=128, moe=moe)


def test_layer_placement_and_statistics():
    config = moe_text(first_dense_layers=1, every_n_layers=2, shared_experts=1, balance="bias")
    model = Llama(config)
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers]
    assert kinds == ["FeedForward", "MoEFeedForward", "FeedForward", "MoEFeedForward"]
    model(torch.randint(0, 64, (2, 7)))
    stats = moe_statistics(model)
    assert set(stats) >= {"moe/layers.1/load/3", "moe/layers.3/imbalance", "moe/layers.1/dropped", "moe/layers.3/bias_spread"}
    assert sum(float(stats[f"moe/layers.1/load/{e}"]) for e in range(4)) == pytest.approx(1.0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown text.moe keys \['experts'\]"):
        LlamaConfig(moe={"experts": 4})
    with pytest.raises(ValueError, match="text.moe.router must be one of"):
        MoEConfig(router="hash")
    with pytest.raises(ValueError, match="balance: none"):
        MoEConfig(router="expert_choice")
    with pytest.raises(ValueError, match=r"top_k \(3\) must be <= num_experts \(2\)"):
        MoEConfig(num_experts=2, top_k=3)
    assert LlamaConfig.from_dict(moe_text().to_dict()) == moe_text()


def test_cached_generation_equals_uncached_with_moe_backbone():
    from tests.tiny_models import tiny_model

    config = tiny_model().config
    config.text = dataclasses.replace(moe_text(), vocab_size=config.text.vocab_size)
    torch.manual_seed(0)
    model = build_model(config).eval()
    prompts = [[1, 7, 9, 11], [1, 3]]
    cached = model.generate(None, prompts, max_new_tokens=10, use_cache=True)
    uncached = model.generate(None, prompts, max_new_tokens=10, use_cache=False)
    assert cached == uncached
    assert all(len(row) == 10 for row in cached)


def test_vlm_export_round_trips_an_moe_backbone(tmp_path):
    from tests.tiny_models import tiny_model
    from vlm.export import load_model, save_model

    config = tiny_model().config
    config.text = dataclasses.replace(moe_text(capacity_factor=1.5, balance="bias"), vocab_size=config.text.vocab_size)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        model.text.layers[0].feed_forward.expert_bias.copy_(torch.tensor([0.05, -0.05, 0.1, -0.1]))
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model").eval()
    ids = torch.randint(6, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ModelInput(ids)).logits, model(ModelInput(ids)).logits)


def test_grouped_mm_probe_under_no_grad():
    """Generation may run the first MoE forward: the probe must not mistake no_grad for no support."""
    moe_module.grouped_mm_supported.cache_clear()
    with torch.no_grad():
        under_no_grad = moe_module.grouped_mm_supported("cpu", torch.float32)
    moe_module.grouped_mm_supported.cache_clear()
    assert under_no_grad == moe_module.grouped_mm_supported("cpu", torch.float32)


def test_activation_checkpointing_recomputes_the_same_routing():
    """Checkpointed MoE blocks (as vlm.training applies them) give the same loss and gradients. A
    recomputation that runs to the end of the layer counts its load again (torch may stop it once
    the tensors backward needs exist); the sign-based bias update is blind to that factor."""
    from torch.distributed._composable import checkpoint

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Llama(moe_text(capacity_factor=1.0, balance="bias", z_loss_coef=0.01)).train()
        if checkpointed:
            for layer in model.layers:
                checkpoint(layer)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        loss = model.loss(ids, ids) + pop_aux_loss(model)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
        pending = model.layers[0].feed_forward.pending_load
        assert pending.sum() in ((2 * 12 * 2,) if not checkpointed else (2 * 12 * 2, 2 * 2 * 12 * 2))  # tokens x top_k
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("capacity_factor", [None, 1.5], ids=["grouped", "padded"])
def test_bf16_autocast_trains_close_to_fp32(capacity_factor):
    """Under autocast (Lightning's bf16-mixed) the experts compute in bf16 and x stays fp32."""
    torch.manual_seed(0)
    model = Llama(moe_text(capacity_factor=capacity_factor))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = model.loss(ids, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(ids, ids)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=2e-2)
    assert model.layers[0].feed_forward.experts.w1.grad.dtype == torch.float32
    assert torch.isfinite(model.layers[0].feed_forward.experts.w1.grad).all()
