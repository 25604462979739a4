"""Mixture-of-Experts feed-forward: a router and `num_experts` SwiGLU experts (+ shared experts).

Routing (`MoEConfig.router`):
- `token_choice`: each token takes its `top_k` experts by score (softmax or sigmoid); the weights
  are the chosen scores, renormalised to sum to 1 (Mixtral). With `capacity_factor` an expert
  takes at most ceil(capacity_factor * top_k * tokens / num_experts) assignments, first choices
  before second choices and earlier tokens first; a dropped assignment adds nothing, so a token
  with all its assignments dropped leaves the layer through the residual only.
- `expert_choice`: each expert takes its top ceil(c * tokens / num_experts) tokens by score (c =
  `capacity_factor`, or `top_k` when null), weighted by those scores; a token no expert took is
  dropped. Selection looks at every token of the forward call, so it is for training: a decoding
  step (one token per row) routes among fewer tokens than a full forward.

Balancing (`balance`): `aux_loss` sets `aux_loss` = coef * E / (k N) * sum_e count_e * P_e (Switch,
1 at a uniform load; count_e: assignments routed to e before any drop, P_e: the mean normalised
score of e); `bias` adds a per-expert bias (a buffer) to the scores for the selection only and
moves it after each optimizer step by `bias_update_rate` * sign(mean load - load), centred
(auxiliary-loss-free balancing, DeepSeek-V3); `none` does neither. `z_loss_coef` adds the router
z-loss, coef * mean(logsumexp(logits)^2) (ST-MoE). The losses stay on the module (`aux_loss`) until
the training side collects them with `pop_aux_loss`; nothing is global. They are computed in
training mode with gradients on (a forward in `eval()` or under `no_grad` leaves `aux_loss` None).

Dispatch: the (token, expert) assignments are sorted by expert and the experts run as grouped
matrix products, `torch._grouped_mm` where it runs for the device and dtype, else one batched
matmul over a [num_experts, capacity, dim] buffer (capacity: the configured one, else the largest
expert load: one host sync per layer, only on that fallback). No loop over tokens or experts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("token_choice", "expert_choice")
SCORES = ("softmax", "sigmoid")
BALANCES = ("aux_loss", "bias", "none")


@dataclass
class MoEConfig:
    """`text.moe`: which decoder layers are MoE and how they route. Layer i is an MoE layer when
    i >= first_dense_layers and (i - first_dense_layers) % every_n_layers == 0. Expert size:
    `expert_hidden_dim`, or the text config's `hidden_dim` when null (Mixtral)."""

    num_experts: int = 8
    top_k: int = 2
    router: str = "token_choice"
    score: str = "softmax"
    capacity_factor: float | None = None  # null: no token is dropped (token choice)
    balance: str = "aux_loss"
    aux_loss_coef: float = 0.01
    bias_update_rate: float = 1e-3
    z_loss_coef: float = 0.0
    shared_experts: int = 0
    every_n_layers: int = 1
    first_dense_layers: int = 0
    expert_hidden_dim: int | None = None
    renormalize: bool = True  # token choice: chosen weights sum to 1

    def __post_init__(self) -> None:
        for name, allowed in (("router", ROUTERS), ("score", SCORES), ("balance", BALANCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"text.moe.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("num_experts", "top_k", "every_n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"text.moe.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("shared_experts", "first_dense_layers", "aux_loss_coef", "bias_update_rate", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"text.moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"text.moe.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"text.moe.capacity_factor must be positive or null, got {self.capacity_factor}")
        if self.expert_hidden_dim is not None and self.expert_hidden_dim < 1:
            raise ValueError(f"text.moe.expert_hidden_dim must be positive or null, got {self.expert_hidden_dim}")
        if self.router == "expert_choice" and self.balance != "none":
            raise ValueError("text.moe.router expert_choice balances by construction: set text.moe.balance: none")

    @classmethod
    def from_dict(cls, values: dict) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown text.moe keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def is_moe_layer(self, layer_idx: int) -> bool:
        offset = layer_idx - self.first_dense_layers
        return offset >= 0 and offset % self.every_n_layers == 0


@cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward here (probed once per device type and
    dtype; older torch builds and some device/dtype pairs lack it)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.enable_grad():  # the first MoE forward may run under no_grad (generation)
            return _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError):
        return False


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_here(device_type: str, dtype: torch.dtype) -> bool:
    """`grouped_mm_supported`, remembered for compiled code, which cannot run the probe (it makes
    tensors that require gradients): there a pair never probed eagerly takes the padded path, and
    so does float32 (torch's shape function for `_grouped_mm` accepts bf16 only, though the CPU
    kernel runs float32)."""
    if torch.compiler.is_compiling():
        return _PROBED.get((device_type, dtype), False) and dtype == torch.bfloat16
    _PROBED[device_type, dtype] = grouped_mm_supported(device_type, dtype)
    return _PROBED[device_type, dtype]


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    x = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
    offsets = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    y.backward(torch.ones_like(y))
    return True


class Experts(nn.Module):
    """`num_experts` SwiGLU experts as stacked weights, each expert's slice shaped like a Linear's
    weight: w1, w3 [E, H, D] (gate, up), w2 [E, D, H] (down)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for weight in (self.w1, self.w2, self.w3):
            nn.init.normal_(weight, mean=0.0, std=std)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, C, D] (expert e's tokens in row e) -> [E, C, D]."""
        h = F.silu(torch.bmm(x, self.w1.transpose(1, 2))) * torch.bmm(x, self.w3.transpose(1, 2))  # [E, C, H]
        return torch.bmm(h, self.w2.transpose(1, 2))

    def grouped(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """x [M, D], rows sorted by expert; `ends` [E] int32: cumulative row counts -> [M, D]."""
        h1 = torch._grouped_mm(x, self.w1.transpose(1, 2), offs=ends)
        h3 = torch._grouped_mm(x, self.w3.transpose(1, 2), offs=ends)
        return torch._grouped_mm(F.silu(h1) * h3, self.w2.transpose(1, 2), offs=ends)


@dataclass
class Routing:
    """One forward call's assignments, sorted by expert. A = number of assignments."""

    token: torch.Tensor  # [A] row of x
    expert: torch.Tensor  # [A] nondecreasing
    weight: torch.Tensor  # [A] float32, 0 for a dropped assignment
    counts: torch.Tensor  # [E] assignments routed to each expert (before any drop)
    capacity: int | None  # rows per expert in the padded buffer; None: unbounded (no drop)
    dropped: torch.Tensor  # scalar: share of tokens (expert choice) or assignments (token choice) dropped
    slot: torch.Tensor | None = None  # [A] position within its expert's group (made when needed)

    def slots(self) -> torch.Tensor:
        if self.slot is None:
            starts = self.counts.cumsum(0) - self.counts  # [E] first row of each expert's group
            self.slot = torch.arange(self.expert.numel(), device=self.expert.device) - starts[self.expert]
        return self.slot


class MoEFeedForward(nn.Module):
    """Router (`gate`), routed `experts`, and an optional always-on `shared` feed-forward (the
    Llama gives it a SwiGLU of shared_experts x the expert size).

    forward: x [B, T, D] -> [B, T, D]; sets `last_load` and `last_dropped` (logging), `aux_loss`
    (training) and, with bias balancing in training, adds the load to `pending_load`."""

    def __init__(self, dim: int, config: MoEConfig, *, hidden_dim: int, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(dim, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, dim, hidden_dim)
        self.shared = shared
        if config.balance == "bias":
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.pending_load: torch.Tensor | None = None  # bias balancing: loads since the last optimizer step
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None  # [E] assignments per expert, last forward
        self.last_dropped: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.gate(x).float()  # [N, E]
        scores = logits.softmax(-1) if self.config.score == "softmax" else logits.sigmoid()
        route = self._expert_choice(scores) if self.config.router == "expert_choice" else self._token_choice(scores)
        y = self._dispatch(x, route)
        if self.shared is not None:
            y = y + self.shared(x)
        self._record(logits, scores, route)
        return y.view(shape)

    def _token_choice(self, scores: torch.Tensor) -> Routing:
        c, (n, e) = self.config, scores.shape
        choice = scores + self.expert_bias if c.balance == "bias" else scores
        chosen = choice.topk(c.top_k, dim=-1).indices  # [N, k]
        weight = scores.gather(-1, chosen)
        if c.renormalize:
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        # k-major order: every token's first choice before any second choice (capacity priority).
        expert, order = chosen.T.reshape(-1).sort(stable=True)
        token = torch.arange(n, device=scores.device).repeat(c.top_k)[order]
        weight = weight.T.reshape(-1)[order]
        counts = torch.zeros(e, dtype=torch.long, device=scores.device).scatter_add(0, expert, torch.ones_like(expert))
        route = Routing(token, expert, weight, counts, None, scores.new_zeros(()))  # counts: bincount, static shape
        if c.capacity_factor is not None:
            route.capacity = math.ceil(c.capacity_factor * c.top_k * n / e)
            kept = route.slots() < route.capacity
            route.weight = weight * kept
            route.dropped = 1.0 - kept.float().mean()
        return route

    def _expert_choice(self, scores: torch.Tensor) -> Routing:
        c, (n, e) = self.config, scores.shape
        capacity = min(n, math.ceil((c.capacity_factor or c.top_k) * n / e))
        weight, token = scores.T.topk(capacity, dim=-1)  # [E, C]
        expert = torch.arange(e, device=scores.device).repeat_interleave(capacity)
        slot = torch.arange(capacity, device=scores.device).repeat(e)
        taken = torch.zeros(n, device=scores.device, dtype=torch.bool).index_fill(0, token.reshape(-1), True)
        counts = torch.full((e,), capacity, device=scores.device, dtype=torch.long)
        return Routing(token.reshape(-1), expert, weight.reshape(-1), counts, capacity, 1.0 - taken.float().mean(), slot)

    def _dispatch(self, x: torch.Tensor, route: Routing) -> torch.Tensor:
        """Run every assignment through its expert; sum the weighted outputs per token."""
        rows = x[route.token]  # [A, D], sorted by expert
        if route.capacity is None and _grouped_mm_here(x.device.type, x.dtype) and _aligned(self.experts, x):
            ends = route.counts.cumsum(0).to(torch.int32)
            out = self.experts.grouped(rows, ends)
        else:
            out = self._padded(rows, route)
        out = out * route.weight.to(out.dtype)[:, None]
        # In the experts' dtype: under autocast their matmuls return bf16 while x stays fp32.
        return out.new_zeros(x.shape).index_add(0, route.token, out)

    def _padded(self, rows: torch.Tensor, route: Routing) -> torch.Tensor:
        """The padded batched matmul: assignments beyond the capacity go to a spare row per expert
        whose output is multiplied by a zero weight."""
        e, d = self.config.num_experts, rows.shape[-1]
        capacity = route.capacity
        if capacity is None and torch.compiler.is_compiling():
            # A static bound instead of reading the largest load (a graph break): an expert gets at
            # most every token once. Exact, but E / top_k times the work: compiled runs that use
            # this path (no grouped GEMM) should set a capacity_factor.
            capacity = rows.shape[0] // self.config.top_k
        elif capacity is None:
            capacity = int(route.counts.max())
        index = route.expert * (capacity + 1) + route.slots().clamp_max(capacity)  # [A]
        buffer = rows.new_zeros(e * (capacity + 1), d).index_copy(0, index, rows)
        out = self.experts.padded(buffer.view(e, capacity + 1, d)).reshape(-1, d)
        return out[index]

    def _record(self, logits: torch.Tensor, scores: torch.Tensor, route: Routing) -> None:
        """Statistics for logging, the balancing loss, and the load the bias update will use."""
        c = self.config
        self.last_load, self.last_dropped = route.counts.detach(), route.dropped.detach()
        if not (self.training and torch.is_grad_enabled()):  # the losses train the router: not in evaluation
            self.aux_loss = None
            return
        losses = []
        if c.balance == "aux_loss" and c.aux_loss_coef > 0:
            losses.append(c.aux_loss_coef * switch_loss(scores, route.counts, c.top_k))
        if c.z_loss_coef > 0:
            losses.append(c.z_loss_coef * torch.logsumexp(logits, -1).pow(2).mean())
        self.aux_loss = sum(losses) if losses else None
        if c.balance == "bias":
            load = route.counts.detach().float()
            self.pending_load = load if self.pending_load is None else self.pending_load + load

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """expert_bias += rate * sign(mean load - load), centred: overloaded experts get chosen less."""
        delta = self.config.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias += (delta - delta.mean()).to(self.expert_bias.dtype)
        self.pending_load = None


def switch_loss(scores: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """E / (k N) * sum_e count_e * P_e, P_e the mean over tokens of the per-token normalised scores
    [N, E]; gradients flow through P only. 1 when both are uniform."""
    n, e = scores.shape
    probs = scores / scores.sum(-1, keepdim=True)
    return e / (top_k * n) * (counts.float() * probs.mean(0)).sum()


def _aligned(experts: Experts, x: torch.Tensor) -> bool:
    """Grouped GEMMs want 16-byte aligned rows."""
    hidden, dim = experts.w1.shape[1:]
    return (hidden * x.element_size()) % 16 == 0 and (dim * x.element_size()) % 16 == 0


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """(name, layer) of every MoE feed-forward in `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def pop_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the MoE layers' balancing losses from the last forward (None without any), each
    cleared so that a later forward cannot count it twice."""
    total = None
    for _, layer in moe_layers(model):
        if layer.aux_loss is not None:
            total = layer.aux_loss if total is None else total + layer.aux_loss
            layer.aux_loss = None
    return total


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> None:
    """After an optimizer step: move every bias-balanced layer's bias by the load it routed since
    the last step, summed over the ranks of the default process group (one all-reduce), so that
    every rank keeps the same bias."""
    layers = [layer for _, layer in moe_layers(model) if layer.pending_load is not None]
    if not layers:
        return
    loads = torch.stack([layer.pending_load for layer in layers])  # [L, E]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    for layer, load in zip(layers, loads):
        layer.update_bias(load)


def moe_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per MoE layer, from its last forward: each expert's share of the assignments (`load/E`), the
    largest share over the mean (`imbalance`), the dropped share, and the bias spread (max - min)."""
    stats: dict[str, torch.Tensor] = {}
    for name, layer in moe_layers(model):
        if layer.last_load is None:
            continue
        prefix = f"moe/{name.removesuffix('.feed_forward').removeprefix('text.')}"
        share = layer.last_load.float() / layer.last_load.sum().clamp_min(1)
        for expert, value in enumerate(share):
            stats[f"{prefix}/load/{expert}"] = value
        stats[f"{prefix}/imbalance"] = share.max() * share.numel()
        stats[f"{prefix}/dropped"] = layer.last_dropped
        if hasattr(layer, "expert_bias"):
            stats[f"{prefix}/bias_spread"] = layer.expert_bias.max() - layer.expert_bias.min()
    return stats
