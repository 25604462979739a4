"""Delayed-scaling fp8 linear layers: the classic Transformer Engine recipe, which torchao dropped.

Each fp8 cast (input, weight, grad_output) keeps an amax history of the last `history_len`
training steps. A tensor is cast with the scale computed from that history *before* its own amax
is recorded, so no extra pass over the tensor is needed to pick its scale:

    scale = fp8_max / (max(amax_history) * 2**margin)     # kept unchanged when that max is 0, inf or NaN

Inputs and weights are cast to e4m3 (more mantissa), gradients to e5m2 (more range). Values beyond
the scaled range saturate to +-fp8_max. The matmuls run in `torch._scaled_mm` (CPU, and CUDA on
fp8-capable GPUs) with fp32 or bf16 output, and as a dequantised matmul where it cannot run.

Deviations from Transformer Engine, on purpose:
- Until a first amax is recorded (the first step, or always for a frozen tower kept in eval mode),
  casts scale just in time from the tensor's own amax, rather than with an arbitrary scale of 1.
- Only training-mode calls record (validation and generation leave the history alone).
- In a process group the amax of inputs and gradients is all-reduced (max) before it is recorded,
  so every rank holds the same history and scales (weights are identical on every rank at compute
  time under DDP and FSDP2, so they are not reduced). Tensor parallelism is not supported.

Activation checkpointing recomputes the forward, which records the input and weight amax a
second time (the same values), so the effective window is halved for those casts.

The state (histories and scales) lives in non-persistent buffers: the model's state_dict stays the
plain nn.Linear one, so checkpoints load into unconverted models. `Float8Precision` saves and
restores the state through its own state_dict (see `float8_state`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class Float8Scaling(nn.Module):
    """Amax history and current scale of one fp8 cast.

    Buffers: amax_history [L] and scale [] (fp32), and `recorded` [] (bool: an amax was recorded).
    A NaN or inf amax stays in the history, so the scale is held until it leaves the window.
    """

    def __init__(self, fp8_dtype: torch.dtype, *, history_len: int = 16, margin: int = 0, reduce: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if history_len < 1:
            raise ValueError(f"fp8 delayed scaling: history_len must be >= 1, got {history_len}")
        self.fp8_dtype, self.margin, self.reduce = fp8_dtype, margin, reduce
        self.fp8_max = torch.finfo(fp8_dtype).max
        self.register_buffer("amax_history", torch.zeros(history_len, device=device), persistent=False)
        self.register_buffer("scale", torch.ones((), device=device), persistent=False)
        self.register_buffer("recorded", torch.zeros((), dtype=torch.bool, device=device), persistent=False)

    def reset_parameters(self) -> None:
        """Empty history, unit scale (also how meta-device materialisation initialises the buffers)."""
        with torch.no_grad():
            self.amax_history.zero_()
            self.scale.fill_(1.0)
            self.recorded.fill_(False)

    def scale_from(self, amax: torch.Tensor) -> torch.Tensor:
        """fp8_max / (amax * 2**margin), or the current scale when amax is 0, inf or NaN."""
        amax = amax.float()
        candidate = self.fp8_max / (amax * 2.0**self.margin)
        usable = torch.isfinite(amax) & (amax > 0) & torch.isfinite(candidate)
        return torch.where(usable, candidate, self.scale)

    @torch.no_grad()
    def cast(self, tensor: torch.Tensor, *, record: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """tensor -> (fp8 tensor of the same shape, inverse scale []). With `record`, the tensor's
        amax enters the history and the scale is recomputed for the next call."""
        amax = tensor.abs().amax().float() if tensor.numel() else torch.zeros((), device=tensor.device)
        if record and self.reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        scale = torch.where(self.recorded, self.scale, self.scale_from(amax))
        # Saturate: an outlier above the history's range becomes fp8_max instead of NaN (e4m3fn has no inf).
        fp8 = (tensor.float() * scale).clamp(-self.fp8_max, self.fp8_max).to(self.fp8_dtype)
        if record:
            self.amax_history.copy_(torch.roll(self.amax_history, 1))
            self.amax_history[0] = amax
            self.scale.copy_(self.scale_from(self.amax_history.max()))
            self.recorded.fill_(True)
        return fp8, scale.reciprocal()


def _scaled_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._scaled_mm runs a [M, K] @ b [N, K].T here (CPU: any shape; CUDA: sm89+, K and N
    multiples of 16, not both operands e5m2)."""
    if a.device.type == "cpu":
        return True
    if a.device.type != "cuda" or torch.cuda.get_device_capability(a.device) < (8, 9):
        return False
    return a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and not (a.dtype == b.dtype == E5M2)


def fp8_matmul(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor, *, out_dtype: torch.dtype) -> torch.Tensor:
    """(a * a_inv) @ (b * b_inv).T for fp8 a [M, K], b [N, K] and inverse scales [] -> [M, N] in out_dtype."""
    if a.device.type == "cuda" and a.shape[1] % 16:  # cuBLAS needs the inner dim in multiples of 16
        pad = 16 - a.shape[1] % 16
        a = torch.nn.functional.pad(a.view(torch.uint8), (0, pad)).view(a.dtype)
        b = torch.nn.functional.pad(b.view(torch.uint8), (0, pad)).view(b.dtype)
    if _scaled_mm_ok(a, b):
        # row-major a, column-major b: the layout cuBLAS requires (and the CPU kernel accepts)
        return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)
    return ((a.float() * a_inv) @ (b.float() * b_inv).t()).to(out_dtype)


class _DelayedFloat8Matmul(torch.autograd.Function):
    """y = x @ w.T with fp8 operands: x, w in e4m3 forward; grad_y in e5m2 backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, layer: DelayedFloat8Linear) -> torch.Tensor:
        # x [M, K], weight [N, K] -> [M, N]
        record = layer.training
        x8, x_inv = layer.scaling_input.cast(x, record=record)
        w8, w_inv = layer.scaling_weight.cast(weight, record=record)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.layer, ctx.record, ctx.dtypes = layer, record, (x.dtype, weight.dtype)
        return fp8_matmul(x8, x_inv, w8, w_inv, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = ctx.layer.scaling_grad.cast(grad_y, record=ctx.record)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [M, N] @ [N, K]
            grad_x = fp8_matmul(g8, g_inv, w8.t(), w_inv, out_dtype=ctx.dtypes[0])
        if ctx.needs_input_grad[1]:  # [N, M] @ [M, K]
            grad_w = fp8_matmul(g8.t(), g_inv, x8.t(), x_inv, out_dtype=ctx.dtypes[1])
        return grad_x, grad_w, None


class DelayedFloat8Linear(nn.Linear):
    """An nn.Linear whose matmuls run in fp8 with delayed scaling. Same parameters, same state_dict.

    Submodules `scaling_input`, `scaling_weight` (e4m3) and `scaling_grad` (e5m2) hold the state.
    Under torch.autocast the input is cast to the autocast dtype first (weights stay as they are:
    they go to fp8 straight from the master copy) and the output has that dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, history_len: int = 16,
                 margin: int = 0, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scaling_input = Float8Scaling(E4M3, history_len=history_len, margin=margin, device=device)
        self.scaling_weight = Float8Scaling(E4M3, history_len=history_len, margin=margin, reduce=False, device=device)
        self.scaling_grad = Float8Scaling(E5M2, history_len=history_len, margin=margin, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, history_len: int = 16, margin: int = 0) -> DelayedFloat8Linear:
        """Wrap `linear`'s own parameters (no copy); state starts empty on the weight's device."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      history_len=history_len, margin=margin)
        new.weight, new.bias = linear.weight, linear.bias
        for scaling in (new.scaling_input, new.scaling_weight, new.scaling_grad):
            scaling.to_empty(device=linear.weight.device)
            scaling.reset_parameters()
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            y = _DelayedFloat8Matmul.apply(x.reshape(-1, self.in_features), self.weight, self)
            y = y.unflatten(0, x.shape[:-1])  # [M, N] -> [..., N]
            return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe=delayed, history_len={self.scaling_input.amax_history.numel()}"


def float8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every delayed-scaling buffer of `model` by a name that ignores checkpoint/compile wrappers."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Float8Scaling):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                state[f"{_plain_name(name)}.{buffer_name}"] = buffer.detach().clone()
    return state


def load_float8_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `float8_state`; the layer names must match exactly."""
    buffers = {}
    for name, module in model.named_modules():
        if isinstance(module, Float8Scaling):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                buffers[f"{_plain_name(name)}.{buffer_name}"] = buffer
    missing, unexpected = sorted(set(buffers) - set(state)), sorted(set(state) - set(buffers))
    if missing or unexpected:
        raise ValueError(f"fp8 delayed-scaling state does not match the model: missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    with torch.no_grad():
        for key, buffer in buffers.items():
            if state[key].shape != buffer.shape:
                raise ValueError(f"fp8 state {key}: shape {tuple(state[key].shape)} in the checkpoint, "
                                 f"{tuple(buffer.shape)} in the model (was history_len changed?)")
            buffer.copy_(state[key])


def _plain_name(name: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name
