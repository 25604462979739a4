"""Next-token cross-entropy fused with the output projection, computed in chunks.

The plain route materialises logits [B, T, V] (1 GB for a batch of 8 x 2048 tokens with a
128k vocabulary), then their log-softmax and its gradient. Here each chunk of positions computes
its logits, loss and both gradients at once and frees them; positions labelled `ignore_index`
(prompts, image tokens, padding: most of a VLM batch) never reach the projection at all.

Under `torch.compile` the selection of those positions (`nonzero`, whose size depends on the data)
would break the graph, so compiled code takes a static-shape path instead: every position goes
through the projection in fixed chunks and ignored ones are masked out of the loss and gradients.
It gives the same loss and gradients (tested), and pays the head's FLOPs on ignored positions.
"""

from __future__ import annotations

import torch

from vlm.text.chat import IGNORE_INDEX


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int, label_smoothing: float):  # noqa: ANN001
        total, grad_h, grad_w = _loss_and_grads(hidden, weight, labels, chunk_size, ignore_index, label_smoothing,
                                                need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        # Compiled code never reads the value on the host (a graph break): it always scales.
        if torch.compiler.is_compiling() or grad_out.numel() != 1 or float(grad_out) != 1.0:  # the loss is usually the root: skip two copies
            grad_h = grad_h * grad_out if grad_h is not None else None
            grad_w = grad_w * grad_out if grad_w is not None else None
        grad_w = grad_w.to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def _loss_and_grads(hidden, weight, labels, chunk_size, ignore_index, label_smoothing, *, need_h: bool, need_w: bool):
    # hidden [N, D], weight [V, D], labels [N]
    device = hidden.device.type
    # Under autocast the matmuls run in its dtype (as the head would), softmax in float32, and the
    # weight gradient accumulates in float32; autocast itself is off so that dtypes stay explicit.
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    chunked = _chunked_static if torch.compiler.is_compiling() else _chunked
    with torch.autocast(device, enabled=False):
        return chunked(hidden, weight.to(compute), labels, chunk_size, ignore_index, label_smoothing,
                        need_h=need_h, need_w=need_w)


def _chunked(hidden, weight, labels, chunk_size, ignore_index, label_smoothing, *, need_h: bool, need_w: bool):
    # With smoothing eps the target is (1 - eps) one-hot + eps / V uniform: the loss gains eps times
    # the mean of -log p over the vocabulary, and the logits' gradient is softmax - target.
    uniform = label_smoothing / weight.shape[0]
    keep = (labels != ignore_index).nonzero().squeeze(1)
    count = max(int(keep.numel()), 1)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, keep.numel(), chunk_size):
        rows = keep[start : start + chunk_size]
        h, y = hidden[rows].to(weight.dtype), labels[rows]
        logits = (h @ weight.T).float()  # [n, V]
        log_probs = torch.log_softmax(logits, -1, out=logits)  # in place: one [n, V] buffer per chunk
        picked = log_probs.gather(1, y[:, None]).sum()
        if label_smoothing:
            total -= (1.0 - label_smoothing) * picked + uniform * log_probs.sum()
        else:
            total -= picked
        if need_h or need_w:
            grad = log_probs.exp_()  # softmax, in place
            grad[torch.arange(len(rows), device=grad.device), y] -= 1.0 - label_smoothing
            if label_smoothing:
                grad.sub_(uniform)
            # The mean's 1/count scales the two small products, not the [n, V] gradient.
            if need_h:
                grad_h[rows] = (grad.to(weight.dtype) @ weight).mul_(1.0 / count).to(grad_h.dtype)
            if need_w:
                grad_w.addmm_(grad.T, h.float(), alpha=1.0 / count)
    return total / count, grad_h, grad_w


def _chunked_static(hidden, weight, labels, chunk_size, ignore_index, label_smoothing, *, need_h: bool, need_w: bool):
    # `_chunked` without the data-dependent selection: all N positions in chunks, ignored rows
    # weighted 0 (their label replaced by 0 so that gather stays in range).
    uniform = label_smoothing / weight.shape[0]
    keep = labels != ignore_index  # [N]
    scale = 1.0 / keep.sum().clamp_min(1).float()
    targets = torch.where(keep, labels, 0)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size].to(weight.dtype), targets[start : start + chunk_size]
        weight_rows = keep[start : start + chunk_size, None].float()  # [n, 1]
        log_probs = torch.log_softmax((h @ weight.T).float(), -1)  # [n, V]
        per_row = log_probs.gather(1, y[:, None])  # [n, 1]
        if label_smoothing:
            per_row = (1.0 - label_smoothing) * per_row + uniform * log_probs.sum(-1, keepdim=True)
        total = total - (per_row * weight_rows).sum()
        if need_h or need_w:
            target = torch.nn.functional.one_hot(y, weight.shape[0]).float() * (1.0 - label_smoothing) + uniform
            grad = (log_probs.exp() - target) * (weight_rows * scale)  # [n, V]
            if need_h:
                grad_h[start : start + chunk_size] = (grad.to(weight.dtype) @ weight).to(grad_h.dtype)
            if need_w:
                grad_w = grad_w + grad.T @ h.float()
    return total * scale, grad_h, grad_w


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk that keep one chunk's logits near 2**26 values (256 MB in float32)."""
    return max(256, min(8192, 2**26 // vocab_size))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over non-ignored positions.

    hidden [..., D], weight [V, D], labels [...] (already aligned: labels[i] is the target of
    hidden[i]). Returns a scalar; 0 when every label is ignored. `chunk_size` rows are computed at
    a time; by default as many as keep one chunk's logits near 2**26 values (256 MB in float32).
    `label_smoothing` eps in [0, 1) is `F.cross_entropy`'s: each position's loss is
    (1 - eps) * (-log p[label]) + eps * mean over all V classes of -log p.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_size, ignore_index, label_smoothing)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(*args)
    # Inside apply() needs_input_grad follows requires_grad even under no_grad: validation would pay
    # for both gradients (a [V, D] buffer and the softmax gradient) and throw them away.
    return _loss_and_grads(*args, need_h=False, need_w=False)[0]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [B, T] -> targets [B, T] where position t predicts token t+1 (last is ignored)."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)
