"""Decoding: greedy, temperature, top-k, top-p, stop tokens, batched left-padded prompts, KV cache.

The loop only needs a function from new tokens to next-token logits, so the text model and the
vision-language model (whose first step also reads images) share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlm.text.llama import Llama


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop_tokens = tuple(self.stop_tokens)


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token [B] from logits [B, V]."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, *, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, T], attention_mask [B, T]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def decode(
    step: Callable[[torch.Tensor], torch.Tensor],
    first_logits: torch.Tensor,
    config: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    all_finished: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """Run the sampling loop from the prompt's last logits [B, V].

    `step(tokens [B, 1]) -> logits [B, V]` advances the model by one token (with its cache).
    `all_finished(local_done) -> bool` decides when to stop from this process's answer, e.g. by
    asking every rank (see `ranks_finished`): rows already finished keep stepping, their tokens
    dropped, so that sharded models issue the same collectives on every rank.
    Returns each row's new tokens, up to and excluding its first stop token.
    """
    batch = first_logits.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=first_logits.device)
    stops = torch.tensor(config.stop_tokens, dtype=torch.long, device=first_logits.device)
    logits = first_logits
    for i in range(config.max_new_tokens):
        token = sample_next(logits, config, generator)
        hit_stop = torch.isin(token, stops) if len(stops) else torch.zeros_like(done)
        for row in (~done & ~hit_stop).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
        done |= hit_stop
        if i == config.max_new_tokens - 1:
            break
        finished = bool(done.all())
        if (all_finished(finished) if all_finished is not None else finished):
            break
        logits = step(token[:, None])
    return out


def ranks_finished(local_done: bool, *, device: torch.device) -> bool:
    """True when every rank of the default process group is done: one all-reduce per call."""
    unfinished = torch.tensor([0 if local_done else 1], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(unfinished)
    return int(unfinished) == 0


@torch.no_grad()
def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens of each, stop excluded."""
    config = SamplingConfig(max_new_tokens, temperature, top_k, top_p, tuple(stop_tokens))
    device = model.tok_embeddings.weight.device
    ids, mask = left_pad(prompts, pad_id, device=device)
    if not use_cache:
        return _generate_uncached(model, ids, mask, config, generator)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    # Only the last prompt position needs logits.
    first = model.output(model.hidden(ids, attention_mask=mask, cache=cache)[:, -1])
    return decode(lambda token: model(token, cache=cache)[:, -1], first, config, generator=generator)


def _generate_uncached(model: Llama, ids: torch.Tensor, mask: torch.Tensor, config: SamplingConfig, generator) -> list[list[int]]:
    """Recompute the whole sequence each step: slow, and the reference the cache is tested against."""
    state = {"ids": ids, "mask": mask}

    def step(token: torch.Tensor) -> torch.Tensor:
        state["ids"] = torch.cat([state["ids"], token], 1)
        state["mask"] = torch.cat([state["mask"], torch.ones_like(token)], 1)
        return model(state["ids"], attention_mask=state["mask"])[:, -1]

    return decode(step, model(ids, attention_mask=mask)[:, -1], config, generator=generator)
