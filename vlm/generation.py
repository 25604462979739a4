"""Decoding: greedy, temperature, top-k, top-p, beam search, repetition penalties, stop tokens,
batched left-padded prompts, KV cache.

The loops only need a function from new tokens to next-token logits (and, for beam search, one
that reorders the model's per-row state), so the text model and the vision-language model (whose
first step also reads images) share them.

Repetition penalties look at the tokens generated so far, never at the prompt: a caption prompt
is a chat template around an image, and penalising its tokens (or the padding of a batch) would
only distort the answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from vlm.text.llama import Cache, Llama


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] = ()
    num_beams: int = 1  # 1: greedy or sampling; > 1: beam search (see `beam_search`)
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    no_repeat_ngram_size: int = 0  # > 0: never generate an n-gram of this size twice
    repetition_penalty: float = 1.0  # > 1: generated tokens' logits are divided (> 0) or multiplied (< 0) by it

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search is deterministic: use temperature 0 with num_beams > 1")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty}")
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


def penalize(logits: torch.Tensor, generated: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Logits [R, V] after the repetition penalty and the n-gram ban, given each row's generated
    tokens [R, t]; unchanged (the same tensor) when neither is on."""
    if config.repetition_penalty != 1.0 and generated.shape[1]:
        logits = logits.float()
        seen = logits.gather(1, generated)  # a token generated twice is penalised once
        seen = torch.where(seen > 0, seen / config.repetition_penalty, seen * config.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if config.no_repeat_ngram_size:
        banned = repeated_ngram_tokens(generated, config.no_repeat_ngram_size, logits.shape[-1])
        logits = logits.masked_fill(banned, float("-inf"))
    return logits


def repeated_ngram_tokens(generated: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """bool [R, V]: the tokens that would complete an n-gram already among a row's tokens [R, t]."""
    rows, length = generated.shape
    banned = torch.zeros(rows, vocab, device=generated.device)
    if length < n:
        return banned.bool()
    grams = generated.unfold(1, n, 1)  # [R, t - n + 1, n]
    tail = generated[:, length - n + 1 :]  # [R, n - 1]: the n-gram the next token would end
    same_start = (grams[..., :-1] == tail[:, None]).all(-1)  # [R, t - n + 1]
    return banned.scatter_add_(1, grams[..., -1], same_start.float()) > 0


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


Item = TypeVar("Item")


def beam_rows(items: Sequence[Item], num_beams: int) -> list[Item]:
    """Each item `num_beams` times in a row: beam search gives each beam of a prompt a row of its own,
    the beams of prompt b at rows b * num_beams ... (b + 1) * num_beams - 1."""
    return [item for item in items for _ in range(num_beams)]


def decode(
    step: Callable[[torch.Tensor], torch.Tensor],
    first_logits: torch.Tensor,
    config: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    all_finished: Callable[[bool], bool] | None = None,
    reorder: Callable[[torch.Tensor], None] | None = None,
    check_every: int | None = None,
) -> list[list[int]]:
    """Run the decoding loop from the prompt's last logits [R, V]: greedy or sampling, or beam
    search when `config.num_beams` > 1 (then R = prompts x num_beams, see `beam_search`).

    `step(tokens [R, 1]) -> logits [R, V]` advances the model by one token (with its cache).
    `reorder(rows [R])` (beam search only) makes row i continue from row `rows[i]`.
    `all_finished(local_done) -> bool` decides when to stop from this process's answer, e.g. by
    asking every rank (see `ranks_finished`): rows already finished keep stepping, their tokens
    dropped, so that sharded models issue the same collectives on every rank.
    Returns each prompt's new tokens, up to and excluding its first stop token.

    The tokens stay on the device in a buffer allocated once; the host reads them at the end, and
    reads whether every row has stopped only every `check_every` tokens (default: every token on
    the CPU, where reading costs nothing, every 8 on an accelerator, where each read waits for the
    device). A row that stopped keeps stepping until then; its tokens after the stop are dropped.
    """
    if config.num_beams > 1:
        if reorder is None:
            raise ValueError("beam search needs `reorder` to move each beam's model state to its rows")
        return beam_search(step, first_logits, config, reorder=reorder, all_finished=all_finished)
    device = first_logits.device
    check_every = check_every or (1 if device.type == "cpu" else 8)
    tokens = torch.zeros(first_logits.shape[0], config.max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(first_logits.shape[0], dtype=torch.bool, device=device)
    stops = torch.tensor(config.stop_tokens, dtype=torch.long, device=device)
    logits, length = first_logits, 0
    for i in range(config.max_new_tokens):
        token = sample_next(penalize(logits, tokens[:, :i], config), config, generator)
        tokens[:, i], length = token, i + 1
        if len(stops):
            done |= torch.isin(token, stops)
        if length == config.max_new_tokens:
            break
        if (len(stops) or all_finished is not None) and length % check_every == 0:
            finished = bool(done.all())
            if all_finished(finished) if all_finished is not None else finished:
                break
        logits = step(token[:, None])
    return [until_stop(row, config.stop_tokens) for row in tokens[:, :length].tolist()]


def until_stop(tokens: list[int], stop_tokens: Sequence[int]) -> list[int]:
    """`tokens` up to and excluding the first stop token."""
    stops = set(stop_tokens)
    return next((tokens[:i] for i, token in enumerate(tokens) if token in stops), tokens)


class _Finished:
    """The best `size` finished hypotheses of one prompt as (score, tokens), best first."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size, self.length_penalty = size, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], sum_logprob: float, length: int) -> None:
        """`length` counts the generated tokens, a final stop token included (its log-prob is in the sum)."""
        self.items.append((sum_logprob / length**self.length_penalty, tokens))
        self.items.sort(key=lambda item: -item[0])  # stable: on a tie the earlier hypothesis stays first
        del self.items[self.size :]

    @property
    def best_score(self) -> float:
        return self.items[0][0] if self.items else float("-inf")


def _best_reachable(sum_logprob: float, length: int, max_length: int, length_penalty: float) -> float:
    """The highest score a running beam of `length` tokens can still finish with: log-probs are
    <= 0, so its sum only falls; a positive penalty gains most from the longest hypothesis, a
    negative one from the shortest (one more token)."""
    if length_penalty > 0:
        return sum_logprob / max_length**length_penalty
    return sum_logprob / (length + 1) ** length_penalty


def beam_search(
    step: Callable[[torch.Tensor], torch.Tensor],
    first_logits: torch.Tensor,
    config: SamplingConfig,
    *,
    reorder: Callable[[torch.Tensor], None],
    all_finished: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """Beam search from the last prompt logits [B * K, V], K = `config.num_beams`; the K rows of
    prompt b are b * K ... (b + 1) * K - 1, and start identical (see `beam_rows`).

    Each step takes, per prompt, the K best continuations of its K beams by sum of log-probs
    (after `penalize`); one ending in a stop token becomes a finished hypothesis with score
    sum / length ** length_penalty, length counting the stop token (each prompt keeps its K best),
    and the next best continuations without a stop token replace it among the K running beams.
    A prompt is done when no running beam can still finish with a higher score than its best
    finished hypothesis (`_best_reachable`), or at `max_new_tokens`, where its running beams count
    as hypotheses of that length. `reorder(rows)` then moves the model state of each
    row's parent beam (always a row of the same prompt) to the row, and `step` feeds the new tokens.
    Done prompts keep stepping like the others (their tokens unused), and `all_finished` is asked
    once per step as in `decode`, so every rank runs the same number of steps.
    Returns the tokens of each prompt's best hypothesis, stop token excluded.
    """
    rows, vocab = first_logits.shape
    if rows % config.num_beams:
        raise ValueError(f"{rows} rows are not a whole number of prompts x {config.num_beams} beams")
    if sum(0 <= token < vocab for token in set(config.stop_tokens)) >= vocab:
        raise ValueError("every token is a stop token")
    if config.max_new_tokens == 0:
        return [[] for _ in range(rows // config.num_beams)]
    beams = _Beams(rows // config.num_beams, config, first_logits.device)
    logits = first_logits
    for i in range(config.max_new_tokens):
        parents, tokens = beams.advance(logits, length=i + 1)
        if i == config.max_new_tokens - 1:
            break
        if (all_finished(all(beams.done)) if all_finished is not None else all(beams.done)):
            break
        reorder(parents)
        logits = step(tokens[:, None])
    return beams.best(length=i + 1)


class _Beams:
    """The running beams of every prompt (rows of the model batch) and their finished hypotheses."""

    def __init__(self, batch: int, config: SamplingConfig, device: torch.device) -> None:
        self.config, self.width, self.stops = config, config.num_beams, set(config.stop_tokens)
        rows = batch * self.width
        self.finished = [_Finished(self.width, config.length_penalty) for _ in range(batch)]
        self.done = [False] * batch
        # The beams of a prompt start equal: only the first may grow, or all K would pick the same tokens.
        sums = torch.full((batch, self.width), float("-inf"), device=device)
        sums[:, 0] = 0
        self.sums = sums.flatten()  # [R] sum of log-probs of each beam
        self.history: list[list[int]] = [[] for _ in range(rows)]
        self.generated = torch.empty(rows, 0, dtype=torch.long, device=device)  # the same, for `penalize`

    def advance(self, logits: torch.Tensor, *, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Take one step from logits [R, V]; returns each row's parent row [R] and new token [R]."""
        logprobs = penalize(logits, self.generated, self.config).float().log_softmax(-1)
        logprobs = logprobs.masked_fill(logprobs.isnan(), float("-inf"))  # a row with every token banned
        vocab = logprobs.shape[1]
        totals = (self.sums[:, None] + logprobs).view(len(self.done), self.width * vocab)
        keep = min(self.width * vocab, (1 + len(self.stops)) * self.width)  # K candidates that are not stops
        top_sums, top_index = totals.topk(keep, dim=1)  # best first
        parents, tokens, sums = self._select(top_sums.tolist(), top_index.tolist(), logprobs.argmax(-1).tolist(),
                                             vocab=vocab, length=length)
        device = logits.device
        parents_t, tokens_t = torch.tensor(parents, device=device), torch.tensor(tokens, device=device)
        self.sums = torch.tensor(sums, device=device)
        self.history = [self.history[p] + [t] for p, t in zip(parents, tokens)]
        self.generated = torch.cat([self.generated[parents_t], tokens_t[:, None]], 1)
        for b in range(len(self.done)):
            if not self.done[b] and length < self.config.max_new_tokens:
                best = max(sums[b * self.width : (b + 1) * self.width])
                reachable = _best_reachable(best, length, self.config.max_new_tokens, self.config.length_penalty)
                self.done[b] = self.finished[b].best_score >= reachable
        return parents_t, tokens_t

    def _select(self, top_sums: list[list[float]], top_index: list[list[int]], fallback: list[int], *, vocab: int,
                length: int) -> tuple[list[int], list[int], list[float]]:
        """Walk each prompt's candidates best first: the K best are the new beams, of which those
        ending in a stop token become finished hypotheses (a done prompt adds none) and the next best
        candidates that are not stops take their places, so that K beams continue. Returns each
        row's parent, token and sum. A candidate of sum -inf is a dead beam (fewer live candidates
        than K): it feeds its parent's likeliest token, never a banned one such as `<|image|>`."""
        parents, tokens, sums = [], [], []
        for b, (cand_sums, cand_index) in enumerate(zip(top_sums, top_index)):
            chosen = 0
            for rank, (total, flat) in enumerate(zip(cand_sums, cand_index)):
                row, token = b * self.width + flat // vocab, flat % vocab
                if token in self.stops:
                    if rank < self.width and not self.done[b] and total > float("-inf"):
                        self.finished[b].add(self.history[row], total, length)
                    continue
                parents.append(row)
                tokens.append(token if total > float("-inf") else fallback[row])
                sums.append(total)
                chosen += 1
                if chosen == self.width:
                    break
        return parents, tokens, sums

    def best(self, *, length: int) -> list[list[int]]:
        """Each prompt's best hypothesis; running beams of prompts not done count, at `length` tokens."""
        sums = self.sums.tolist()
        for b, finished in enumerate(self.finished):
            for row in range(b * self.width, (b + 1) * self.width):
                if not self.done[b] and sums[row] > float("-inf"):
                    finished.add(self.history[row], sums[row], length)
        return [f.items[0][1] if f.items else [] for f in self.finished]


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
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    compile_step: bool = False,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens of each, stop excluded.

    `num_beams` > 1 runs `beam_search` (each prompt's beams are rows of their own from the prompt
    on); the penalties are those of `SamplingConfig`. `compile_step` runs each cached one-token
    step through `torch.compile` (one compiled function for every model; off by default: it does
    not pay on the CPU)."""
    config = SamplingConfig(max_new_tokens, temperature, top_k, top_p, tuple(stop_tokens), num_beams, length_penalty,
                            no_repeat_ngram_size, repetition_penalty)
    device = model.tok_embeddings.weight.device
    ids, mask = left_pad(beam_rows(prompts, num_beams), pad_id, device=device)
    if not use_cache:
        return _generate_uncached(model, ids, mask, config, generator)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    # Only the last prompt position needs logits.
    first = model.output(model.hidden(ids, attention_mask=mask, cache=cache)[:, -1])
    run_step = _compiled_text_step() if compile_step else text_step
    return decode(lambda token: run_step(model, token, cache), first, config, generator=generator,
                  reorder=cache.reorder)


def text_step(model: Llama, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """One cached decoding step of a text model: tokens [R, 1] -> next-token logits [R, V]."""
    return model(token, cache=cache)[:, -1]


_COMPILED: dict[str, Callable] = {}


def _compiled_text_step() -> Callable:
    if "text" not in _COMPILED:
        _COMPILED["text"] = torch.compile(text_step)
    return _COMPILED["text"]


def _generate_uncached(model: Llama, ids: torch.Tensor, mask: torch.Tensor, config: SamplingConfig, generator) -> list[list[int]]:
    """Recompute the whole sequence each step: slow, and the reference the cache is tested against."""
    state = {"ids": ids, "mask": mask}

    def step(token: torch.Tensor) -> torch.Tensor:
        state["ids"] = torch.cat([state["ids"], token], 1)
        state["mask"] = torch.cat([state["mask"], torch.ones_like(token)], 1)
        return model(state["ids"], attention_mask=state["mask"])[:, -1]

    def reorder(rows: torch.Tensor) -> None:
        state["ids"], state["mask"] = state["ids"][rows], state["mask"][rows]

    return decode(step, model(ids, attention_mask=mask)[:, -1], config, generator=generator, reorder=reorder)
