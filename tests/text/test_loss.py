"""The fused loss does no gradient work when no gradient can be asked for."""

import contextlib

import pytest
import torch

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
def test_no_gradient_work_without_grad(chunk_calls, mode, autocast):
    h, w, y = inputs()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp:
        reference = fused_linear_cross_entropy(h, w, y, chunk_size=4)
    assert chunk_calls == [(True, True)] and reference.requires_grad  # the spy sees the training path
    chunk_calls.clear()
    if mode == "inputs_without_grad":
        h, w = h.detach(), w.detach()
    no_grad = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(mode, contextlib.nullcontext())
    with no_grad, amp:
        value = fused_linear_cross_entropy(h, w, y, chunk_size=4)
    assert chunk_calls == [(False, False)]  # no [N, D] / [V, D] buffers, no softmax gradient
    assert not value.requires_grad
    torch.testing.assert_close(value, reference.detach(), atol=0, rtol=0)  # the same computation: bitwise


def test_only_the_trainable_side_gets_a_gradient(chunk_calls):
    h, w, y = inputs()
    fused_linear_cross_entropy(h.detach(), w, y)
    fused_linear_cross_entropy(h, w.detach(), y)
    assert chunk_calls == [(False, True), (True, False)]
