"""Preference objectives (DPO, IPO) as pure functions of per-sequence log-probabilities.

Two steps, both free of any training framework:

1. `sequence_logprobs` / `sequence_logprobs_from_hidden` score each row of a batch: the sum of
   log p(token) over its labelled tokens and how many there were. Labels follow the house
   convention (aligned with `input_ids`, -100 where not scored, logits at t predict token t+1:
   `vlm.text.loss.shift_labels`).
2. `preference_loss` turns the log-probs of chosen and rejected answers under the policy and the
   frozen reference into the loss and TRL's logged metrics.

Which reduction each loss expects ("sigmoid": summed, "ipo": averaged over answer tokens) is in
`LOGPS_REDUCTION`; `logps_for_loss` applies it. With rows of B chosen answers, then B rejected:

    sums, counts = sequence_logprobs_from_hidden(hidden, head.weight, labels)
    policy = logps_for_loss(sums, counts, loss_type=loss_type)  # reference: the same, under no_grad
    out = preference_loss(*policy.chunk(2), *reference.chunk(2), beta=0.1, loss_type=loss_type)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlm.text.chat import IGNORE_INDEX
from vlm.text.loss import default_chunk_size, shift_labels

# loss type -> the per-sequence log-prob it expects: "sum" over answer tokens, or their "mean".
LOGPS_REDUCTION: dict[str, str] = {"sigmoid": "sum", "ipo": "mean"}

# PreferenceOutput field -> the name TRL's DPOTrainer logs it under (batch mean).
PREFERENCE_METRICS: dict[str, str] = {
    "chosen_rewards": "rewards/chosen",
    "rejected_rewards": "rewards/rejected",
    "margins": "rewards/margins",
    "accuracies": "rewards/accuracies",
    "chosen_logps": "logps/chosen",
    "rejected_logps": "logps/rejected",
    "sft": "nll_loss",  # with model.preference.sft_weight > 0
}


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [n, V], targets [n] -> log p(target) [n] in float32."""
    return logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def _scored(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [R, T] -> (targets [R, T] where t predicts t+1, mask [R, T] of scored positions)."""
    targets = shift_labels(labels, ignore_index)
    return targets, targets != ignore_index


def _per_row(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # token_logps [N] in mask's row-major order -> sums [R]; masked_scatter keeps the result
    # connected to the graph even when nothing is scored (a zero gradient, not an error).
    sums = token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps).sum(-1)
    return sums, mask.sum(-1)


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of each row's labelled tokens.

    logits [R, T, V] (position t predicts token t+1), labels [R, T] aligned with the input ids,
    `ignore_index` where not scored. Returns (sum_logps [R] float32, token_counts [R] int64); a row
    with no scored token has sum 0 and count 0. Only scored positions are normalised.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [R, T, V] and labels [R, T], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    targets, mask = _scored(labels, ignore_index)
    return _per_row(_token_logps(logits[mask], targets[mask]), mask)


def sequence_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    recompute: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs(hidden @ weight.T, labels)` without the [R, T, V] logits.

    hidden [R, T, D] (final-norm output), weight [V, D] (the output head), labels [R, T] as in
    `sequence_logprobs`. Scored positions are projected `chunk_size` at a time (default: as many
    as keep one chunk's logits near 2**26 values, as for the training loss). With `recompute`, each
    chunk's logits are recomputed in the backward instead of kept (activation checkpointing), so
    peak memory is one chunk's logits rather than all scored positions'. Gradients flow to both
    `hidden` and `weight`.
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [R, T, D] and labels [R, T], got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, {hidden.shape[2]}], got {tuple(weight.shape)}")
    chunk_size = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets, mask = _scored(labels, ignore_index)
    h, y = hidden[mask], targets[mask]  # [N, D], [N]
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)

    def chunk(h_c: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        return _token_logps(h_c @ weight.T, y_c)

    # split (not slicing) so that the backward joins the chunks' gradients with one cat; with no
    # scored position it yields one empty chunk, which keeps the result connected to the graph
    parts = [checkpoint(chunk, h_c, y_c, use_reentrant=False) if recompute and track else chunk(h_c, y_c)
             for h_c, y_c in zip(h.split(chunk_size), y.split(chunk_size))]
    return _per_row(torch.cat(parts), mask)


def logps_for_loss(sum_logps: torch.Tensor, token_counts: torch.Tensor, *, loss_type: str) -> torch.Tensor:
    """The per-sequence log-prob `loss_type` expects (`LOGPS_REDUCTION`): the sum, or the mean
    over scored tokens (rows without any count as one token, so their mean is 0)."""
    if loss_type not in LOGPS_REDUCTION:
        raise ValueError(f"loss_type must be one of {sorted(LOGPS_REDUCTION)}, got {loss_type!r}")
    if LOGPS_REDUCTION[loss_type] == "sum":
        return sum_logps
    return sum_logps / token_counts.clamp(min=1).to(sum_logps.dtype)


@dataclass
class PreferenceOutput:
    """`loss` is the scalar to minimise; the rest are detached [B] tensors for logging (and `sft`,
    the chosen answers' next-token loss when it is part of `loss`, a detached scalar)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (policy - reference) log-prob of the chosen answer
    rejected_rewards: torch.Tensor
    margins: torch.Tensor  # chosen_rewards - rejected_rewards
    accuracies: torch.Tensor  # 1.0 where chosen_rewards > rejected_rewards
    chosen_logps: torch.Tensor  # the policy log-probs as given
    rejected_logps: torch.Tensor
    sft: torch.Tensor | None = None

    def metrics(self) -> dict[str, torch.Tensor]:
        """Batch means under TRL's logged names (`PREFERENCE_METRICS`)."""
        return {PREFERENCE_METRICS[f.name]: getattr(self, f.name).float().mean()
                for f in fields(self) if f.name in PREFERENCE_METRICS and getattr(self, f.name) is not None}

    def with_sft(self, sums: torch.Tensor, counts: torch.Tensor, weight: float) -> "PreferenceOutput":
        """Add `weight` x the chosen answers' next-token loss (`chosen_nll`) to the loss: RPO's
        `alpha`, TRL's `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, weight]`. It keeps
        the chosen answers likely, which plain DPO lets fall (and generation with them)."""
        nll = chosen_nll(sums, counts)
        return replace(self, loss=self.loss + weight * nll, sft=nll.detach())


def chosen_nll(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The chosen answers' mean next-token loss over all their tokens, from a preference batch's
    per-row summed log-probs and token counts [2B] (chosen rows first)."""
    pairs = sums.shape[0] // 2
    return -sums[:pairs].sum() / counts[:pairs].sum().clamp_min(1).to(sums.dtype)


def _check_preference_args(logps: dict[str, torch.Tensor], beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOGPS_REDUCTION:
        raise ValueError(f"loss_type must be one of {sorted(LOGPS_REDUCTION)}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got {label_smoothing} "
                         f"with {loss_type!r}")
    shape = logps["policy_chosen"].shape
    for name, value in logps.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(value, 'dtype', type(value))}")
        if value.ndim != 1 or value.shape != shape or value.numel() == 0:
            raise ValueError(f"{name} must have the non-empty shape [B] of policy_chosen {tuple(shape)}, "
                             f"got {tuple(value.shape)}")


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """DPO-family loss over B preference pairs, as TRL's DPOTrainer defines it.

    Inputs are per-sequence log-probs [B] of the chosen and rejected answers under the policy
    (with gradients) and the reference (detached here: it is frozen by definition). With
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected), the loss is
    the mean over pairs of:

    - "sigmoid" (DPO): -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h), where
      eps = `label_smoothing` in [0, 0.5) is the probability that a label is flipped (conservative
      DPO; eps = 0 is plain DPO). Expects log-probs SUMMED over answer tokens. TRL >= 1.0 computes
      eps = 0 the same way (its "sigmoid" no longer reads label_smoothing; the smoothed form is
      TRL 0.x's "sigmoid").
    - "ipo": (h - 1 / (2 * beta))**2, beta being the paper's tau. Expects log-probs AVERAGED over
      answer tokens: TRL divides each log-ratio by its answer's token count, which is this h on
      averaged log-probs. `label_smoothing` must be 0.

    `logps_for_loss(sums, counts, loss_type=...)` makes the right input from `sequence_logprobs`.
    Rewards are beta * (policy - reference) of the inputs given, so for "ipo" they are per-token
    (TRL >= 1.0 logs summed rewards for IPO while its loss uses the averages). Computed in at least
    float32.
    """
    logps = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
             "reference_chosen": reference_chosen, "reference_rejected": reference_rejected}
    _check_preference_args(logps, beta, loss_type, label_smoothing)
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    rc, rr = reference_chosen.to(dtype).detach(), reference_rejected.to(dtype).detach()  # frozen by definition
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    h = chosen_logratios - rejected_logratios  # [B]
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    else:  # ipo
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return PreferenceOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracies=(chosen_rewards > rejected_rewards).to(dtype),
        chosen_logps=pc.detach(),
        rejected_logps=pr.detach(),
    )
