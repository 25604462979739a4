"""The fused loss does no gradient work when no gradient can be asked for; label smoothing is
`F.cross_entropy`'s."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from vlm.text import loss as loss_module
from vlm.text.loss import fused_linear_cross_entropy


@pytest.fixture
def chunk_calls(monkeypatch):
    """Records (need_h, need_w) of every call of the chunked kernel."""
    calls = []
    real = loss_module._chunked

    def spy(*args, need_h, need_w):
        calls.append((need_h, need_w))
        return real(*args, need_h=need_h, need_w=need_w)

    monkeypatch.setattr(loss_module, "_chunked", spy)
    return calls


def inputs():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(70, 32, requires_grad=True)
    y = torch.randint(0, 70, (2, 9))
    y[0, :3] = -100
    return h, w, y


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inputs_without_grad"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_no_gradient_work_without_grad(chunk_calls, mode, autocast, eps):
    h, w, y = inputs()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp:
        reference = fused_linear_cross_entropy(h, w, y, chunk_size=4, label_smoothing=eps)
    assert chunk_calls == [(True, True)] and reference.requires_grad  # the spy sees the training path
    chunk_calls.clear()
    if mode == "inputs_without_grad":
        h, w = h.detach(), w.detach()
    no_grad = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(mode, contextlib.nullcontext())
    with no_grad, amp:
        value = fused_linear_cross_entropy(h, w, y, chunk_size=4, label_smoothing=eps)
    assert chunk_calls == [(False, False)]  # no [N, D] / [V, D] buffers, no softmax gradient
    assert not value.requires_grad
    torch.testing.assert_close(value, reference.detach(), atol=0, rtol=0)  # the same computation: bitwise


def test_only_the_trainable_side_gets_a_gradient(chunk_calls):
    h, w, y = inputs()
    fused_linear_cross_entropy(h.detach(), w, y)
    fused_linear_cross_entropy(h, w.detach(), y)
    assert chunk_calls == [(False, True), (True, False)]


# Label smoothing: F.cross_entropy's semantics, value and both gradients, in float32.
SMOOTHING_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def smoothed_reference(h, w, y, eps):
    logits = h.reshape(-1, h.shape[-1]) @ w.T  # materialised [N, V]
    return F.cross_entropy(logits, y.reshape(-1), ignore_index=-100, label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("chunk_size", [4, None])  # 15 kept rows: four chunks, or one
def test_label_smoothing_matches_cross_entropy(eps, chunk_size):
    h, w, y = inputs()
    loss = fused_linear_cross_entropy(h, w, y, chunk_size=chunk_size, label_smoothing=eps)
    ref = smoothed_reference(h, w, y, eps)
    torch.testing.assert_close(loss, ref, **SMOOTHING_TOLERANCE)
    got, expected = torch.autograd.grad(loss, [h, w]), torch.autograd.grad(ref, [h, w])
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r, **SMOOTHING_TOLERANCE)
    assert got[0][0, :3].abs().sum() == 0  # ignored positions get no gradient
    with torch.no_grad():
        assert torch.equal(fused_linear_cross_entropy(h, w, y, chunk_size=chunk_size, label_smoothing=eps), loss.detach())


def test_label_smoothing_zero_is_the_default_bitwise():
    h, w, y = inputs()
    default = fused_linear_cross_entropy(h, w, y, chunk_size=4)
    zero = fused_linear_cross_entropy(h, w, y, chunk_size=4, label_smoothing=0.0)
    assert torch.equal(default, zero)
    for a, b in zip(torch.autograd.grad(default, [h, w]), torch.autograd.grad(zero, [h, w])):
        assert torch.equal(a, b)


def test_label_smoothing_with_every_label_ignored_is_zero():
    h, w, y = inputs()
    loss = fused_linear_cross_entropy(h, w, torch.full_like(y, -100), label_smoothing=0.1)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert loss.item() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_bad_label_smoothing_is_refused(bad):
    h, w, y = inputs()
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        fused_linear_cross_entropy(h, w, y, label_smoothing=bad)
