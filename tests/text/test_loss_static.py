"""The fused loss's static-shape path (taken under torch.compile) equals the eager path and
`F.cross_entropy` on materialised logits, and compiles without a graph break."""

import os

import pytest
import torch
import torch.nn.functional as F

from vlm.text import loss as loss_module
from vlm.text.loss import fused_linear_cross_entropy


# scripts/gpu_check.sh sets VLM_TEST_DEVICE=cuda: the bf16 test then runs on the GPU's kernels.
DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")


def inputs(all_ignored: bool = False):
    torch.manual_seed(0)
    h = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(70, 32, requires_grad=True)
    y = torch.randint(0, 70, (2, 9))
    y[0, :3] = -100
    y[1, -2:] = -100
    if all_ignored:
        y[:] = -100
    return h, w, y


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [4, 64])
@pytest.mark.parametrize("all_ignored", [False, True])
def test_static_path_equals_the_chunked_path(eps, chunk, all_ignored):
    h, w, y = inputs(all_ignored)
    args = (h.detach().reshape(-1, 32), w.detach(), y.reshape(-1), chunk, -100, eps)
    want = loss_module._chunked(*args, need_h=True, need_w=True)
    got = loss_module._chunked_static(*args, need_h=True, need_w=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_loss_is_graph_break_free_and_equals_cross_entropy():
    h, w, y = inputs()
    eps = 0.1  # the smoothing terms too
    h32, w32 = (t.detach().clone().requires_grad_() for t in (h, w))
    compiled = torch.compile(lambda a, b: fused_linear_cross_entropy(a, b, y, chunk_size=5, label_smoothing=eps) * 2.0,
                             backend="aot_eager", fullgraph=True)
    loss = compiled(h32, w32)
    loss.backward()
    ref_h, ref_w = (t.detach().clone().requires_grad_() for t in (h, w))
    ref = F.cross_entropy((ref_h @ ref_w.T).flatten(0, 1), y.flatten(), ignore_index=-100, label_smoothing=eps) * 2.0
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h32.grad, ref_h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w32.grad, ref_w.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_autocast_loss_and_gradients_match_cross_entropy_on_bf16_logits(compiled):
    """Under bf16 autocast the head's product runs in bf16 (as the plain head would) and the
    softmax in float32; the reference is F.cross_entropy of the bf16 logits, in float32."""
    torch.manual_seed(0)
    h = torch.randn(4, 33, 64, device=DEVICE, requires_grad=True)
    w = (torch.randn(300, 64, device=DEVICE) * 0.1).requires_grad_()
    y = torch.randint(0, 300, (4, 33), device=DEVICE)
    y[:, :7] = -100
    fused = lambda a, b: fused_linear_cross_entropy(a, b, y, chunk_size=48)  # noqa: E731
    if compiled:
        fused = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fused(h, w)
    loss.backward()
    ref_h, ref_w = (t.detach().clone().requires_grad_() for t in (h, w))
    logits = (ref_h.bfloat16() @ ref_w.bfloat16().T).float()
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.grad, ref_h.grad, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(w.grad, ref_w.grad, atol=2e-3, rtol=2e-2)
