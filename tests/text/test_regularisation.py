"""Residual dropout in the Llama decoder: off in eval (and at p=0) bit for bit, seeded in training,
applied exactly where DecoderLayer's docstring says, replayed by activation checkpointing."""

import math

import pytest
import torch
from torch.distributed._composable import checkpoint

from vlm.text.llama import Llama, LlamaConfig

P = 0.3


def make(dropout: float, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=128, dropout=dropout))


def ids() -> torch.Tensor:
    return torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))


def test_eval_and_zero_dropout_are_bitwise_the_plain_model():
    dropped, plain = make(P), make(0.0)
    assert dropped.state_dict().keys() == plain.state_dict().keys()  # no new parameters or buffers
    plain.load_state_dict(dropped.state_dict())
    with torch.no_grad():
        reference = plain.eval()(ids())
        assert torch.equal(dropped.eval()(ids()), reference)
        assert torch.equal(plain.train()(ids()), reference)  # p=0 in training: nothing dropped


def test_training_dropout_is_random_but_seeded():
    model = make(P).train()
    with torch.no_grad():
        torch.manual_seed(5)
        first = model(ids())
        torch.manual_seed(5)
        again = model(ids())
        other = model(ids())  # the RNG has moved on
        evaluated = model.eval()(ids())
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, evaluated)


def test_dropout_acts_on_attention_and_ffn_outputs_only():
    model = make(P).train()
    seen, branch_outputs = [], []
    for layer in model.layers:
        layer.residual_dropout.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        for branch in (layer.attention, layer.feed_forward):
            branch.register_forward_hook(lambda m, args, out: branch_outputs.append(out))
    with torch.no_grad():
        model(ids())
    # Called once on each branch output, in order: attention then feed-forward, layer by layer.
    assert len(seen) == 2 * len(model.layers)
    assert all(x is branch for (x, _), branch in zip(seen, branch_outputs))
    inputs = torch.cat([x.flatten() for x, _ in seen])
    outputs = torch.cat([y.flatten() for _, y in seen])
    dropped = outputs == 0
    assert inputs.ne(0).all()
    # 32768 Bernoulli(0.3) draws: a standard deviation of 0.0025 on the fraction.
    assert abs(dropped.float().mean().item() - P) < 5 * math.sqrt(P * (1 - P) / inputs.numel())
    torch.testing.assert_close(outputs[~dropped], inputs[~dropped] / (1 - P), rtol=1e-6, atol=0)
    # With those two sites made identity, a training forward is the eval forward: no other dropout.
    for layer in model.layers:
        layer.residual_dropout.register_forward_hook(lambda m, args, out: args[0])
    with torch.no_grad():
        assert torch.equal(model(ids()), model.eval()(ids()))


def test_activation_checkpointing_replays_the_same_masks():
    labels = ids()
    grads = []
    for recompute in (False, True):
        model = make(P).train()
        if recompute:
            for layer in model.layers:
                checkpoint(layer)  # what vlm.training.parallel applies
        torch.manual_seed(7)
        loss = model.loss(ids(), labels)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout_is_refused(bad):
    with pytest.raises(ValueError, match=r"LlamaConfig\.dropout must be in \[0, 1\)"):
        LlamaConfig(dropout=bad)
    with pytest.raises(ValueError, match=r"LlamaConfig\.dropout"):
        LlamaConfig.from_dict({"dim": 64, "n_heads": 4, "dropout": bad})


def test_dropout_round_trips_through_dicts():
    config = LlamaConfig(dim=64, n_heads=4, dropout=0.1, rope_scaling={"factor": 8.0})
    assert config.to_dict()["dropout"] == 0.1
    assert LlamaConfig.from_dict(config.to_dict()) == config
    assert LlamaConfig.from_dict({"dim": 64, "n_heads": 4}).dropout == 0.0  # older configs: no dropout
