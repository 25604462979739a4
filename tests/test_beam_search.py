"""Beam search: exhaustive search on a tiny vocabulary against brute force, stop tokens and the end
rule, cache on = cache off and batched = one by one for both fusions, the repetition penalties."""

import itertools

import pytest
import torch
from tiny_models import IMAGE_ID, images, open_gates, tiny_model

import vlm.model
from vlm.generation import SamplingConfig, beam_search, decode, generate, repeated_ngram_tokens
from vlm.text.llama import Llama, LlamaConfig

V = 6  # the tiny text model's vocabulary: every sequence of 3 tokens can be scored
PROMPTS = [[1, 2, 3, 0, 4], [4], [2, 2]]


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=2, vocab_size=V, hidden_dim=64)).eval()
    model.reset_parameters(std=0.5)  # peaked distributions: hypotheses differ by clear margins
    return model


def sequence_logprobs(model: Llama, prompt: list[int], sequences: list[tuple[int, ...]]) -> list[float]:
    """Sum of log-probs of each continuation, from one plain forward pass over prompt + continuation."""
    by_length: dict[int, list[int]] = {}
    for i, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(i)
    sums = [0.0] * len(sequences)
    for length, members in by_length.items():
        ids = torch.tensor([prompt + list(sequences[i]) for i in members])
        with torch.no_grad():
            logprobs = model(ids).float().log_softmax(-1)[:, len(prompt) - 1 : -1]  # position t predicts t + 1
        picked = logprobs.gather(-1, ids[:, len(prompt) :, None]).squeeze(-1).sum(-1)
        for i, value in zip(members, picked.tolist()):
            sums[i] = value
    return sums


def brute_force(model: Llama, prompt: list[int], length: int, *, stop: int | None = None,
                length_penalty: float = 0.0) -> list[int]:
    """The best hypothesis of all: every sequence of `length` tokens, or with a stop token, every
    sequence of non-stop tokens ended by the stop (its length counting the stop) or cut at `length`."""
    if stop is None:
        hypotheses = list(itertools.product(range(V), repeat=length))
    else:
        free = [t for t in range(V) if t != stop]
        hypotheses = [s + (stop,) for k in range(length) for s in itertools.product(free, repeat=k)]
        hypotheses += list(itertools.product(free, repeat=length))
    sums = sequence_logprobs(model, prompt, hypotheses)
    scored = sorted(((s / len(h) ** length_penalty, h) for s, h in zip(sums, hypotheses)), reverse=True)
    assert scored[0][0] - scored[1][0] > 1e-4, "near tie: the search may legitimately pick either"
    best = list(scored[0][1])
    return best[:-1] if best and best[-1] == stop else best


def test_exhaustive_beams_find_the_most_likely_sequence(text_model):
    """As many beams as sequences: beam search is exhaustive, so it returns the brute-force best
    (length_penalty 0: the score is the plain sum of log-probs); batched prompts, left padding."""
    expected = [brute_force(text_model, p, 3) for p in PROMPTS]
    exhaustive = dict(max_new_tokens=3, num_beams=V**3, length_penalty=0.0)
    assert generate(text_model, PROMPTS, **exhaustive) == expected
    assert generate(text_model, PROMPTS, use_cache=False, **exhaustive) == expected
    greedy = generate(text_model, PROMPTS, max_new_tokens=3)
    assert greedy != expected  # the search matters here: greedy misses some best sequence


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
def test_finished_shorter_hypotheses_compete_with_longer_ones(text_model, length_penalty):
    """With a stop token, hypotheses of 1, 2, 3 tokens (stop counted) and cut ones of 3 compete by
    sum / length ** length_penalty; as many beams as candidates at the last step (25 prefixes x 6
    tokens) keep every hypothesis: the search is exhaustive."""
    lengths = []
    for stop in range(V):
        expected = [brute_force(text_model, p, 3, stop=stop, length_penalty=length_penalty) for p in PROMPTS]
        got = generate(text_model, PROMPTS, max_new_tokens=3, num_beams=(V - 1) ** 2 * V, stop_tokens=[stop],
                       length_penalty=length_penalty)
        assert got == expected, f"stop token {stop}"
        lengths += [len(e) for e in expected]
    assert min(lengths) < 3 and max(lengths) == 3  # both a finished shorter and a cut hypothesis won


def test_search_ends_when_no_beam_can_win_and_ranks_stay_in_step():
    """A prompt is done once its best finished hypothesis beats every running beam's best reachable
    score; with `all_finished` asking other ranks, done prompts keep stepping, results unchanged."""
    logits = torch.tensor([0.0, 1.0, 0.5, 0.2, 6.0])  # the stop token 4 is far ahead
    calls, reorders = [], []

    def step(tokens):
        calls.append(tokens)
        return logits.expand(tokens.shape[0], -1)

    for length_penalty in (0.0, 1.0):
        config = SamplingConfig(max_new_tokens=6, stop_tokens=(4,), num_beams=2, length_penalty=length_penalty)
        assert decode(step, logits.expand(4, -1), config, reorder=reorders.append) == [[], []]
        assert calls == [] and reorders == []  # done after the first choice: no model step
    others = iter([False, False, True])  # another rank needs two more steps
    out = decode(step, logits.expand(4, -1), config, reorder=reorders.append,
                 all_finished=lambda local: local and next(others))
    assert out == [[], []] and len(calls) == 2 and len(reorders) == 2
    calls.clear()
    out = decode(step, logits.expand(4, -1), config, reorder=lambda rows: None, all_finished=lambda local: False)
    assert out == [[], []]
    assert len(calls) == 5  # capped by max_new_tokens


def test_search_goes_on_while_a_longer_hypothesis_can_still_win():
    """First step: the stop token (log-prob -0.5) ends a hypothesis of length 1, the best running
    beam has -1.2; then its next token is near certain. With length_penalty 1 that beam reaches
    -1.2 / 6 > -0.5 at 6 tokens, so the search must not end when it stands at -1.2 / 2 < -0.5."""
    first = torch.tensor([[0.607, 0.301, 0.092]]).log().expand(2, -1)  # stop 0, then 1, then 2
    certain = torch.tensor([-30.0, 30.0, -30.0])

    def run(length_penalty):
        config = SamplingConfig(max_new_tokens=6, stop_tokens=(0,), num_beams=2, length_penalty=length_penalty)
        return decode(lambda tokens: certain.expand(tokens.shape[0], -1), first, config, reorder=lambda rows: None)

    assert run(1.0) == [[1] * 6]
    assert run(0.0) == [[]] and run(-0.5) == [[]]


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_one_beam_is_greedy(fusion, monkeypatch):
    model, prompts, imgs = _vlm(fusion)
    greedy = model.generate(imgs, prompts, max_new_tokens=8)
    assert model.generate(imgs, prompts, max_new_tokens=8, num_beams=1) == greedy
    # The beam machinery itself with one beam (no length penalty) is greedy too, stop tokens included.
    monkeypatch.setattr(vlm.model, "decode", lambda step, first, config, **kw: beam_search(
        step, first, config, reorder=kw["reorder"], all_finished=kw["all_finished"]))
    assert model.generate(imgs, prompts, max_new_tokens=8, length_penalty=0.0) == greedy
    stop = greedy[0][2]
    cut = [row[: row.index(stop)] if stop in row else row for row in greedy]
    assert model.generate(imgs, prompts, max_new_tokens=8, length_penalty=0.0, stop_tokens=[stop]) == cut


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_cached_equals_uncached_and_batched_equals_one_by_one(fusion):
    model, prompts, imgs = _vlm(fusion)
    free = model.generate(imgs, prompts, max_new_tokens=8, num_beams=3, length_penalty=0.7)
    assert free != model.generate(imgs, prompts, max_new_tokens=8)  # the beams find other captions than greedy
    stop = free[0][3]  # a stop token the search meets
    kw = dict(max_new_tokens=8, num_beams=3, stop_tokens=[stop], length_penalty=0.7)
    single = [model.generate([i], [p], **kw)[0] for p, i in zip(prompts, imgs)]
    assert model.generate(imgs, prompts, **kw) == single
    assert model.generate(imgs, prompts, use_cache=False, **kw) == single
    assert min(map(len, single)) < 8  # some hypothesis finished


def _vlm(fusion: str):
    """A tiny model with sharp distributions, and prompts of different lengths and image counts."""
    model = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(model, 1.0)
    torch.manual_seed(1)
    model.text.reset_parameters(std=0.2)  # varied, peaked distributions: clear margins between hypotheses
    prompts = [[1, IMAGE_ID, 9, 10, IMAGE_ID, 12], [2, IMAGE_ID, 3], [IMAGE_ID, 7, 8, 9, 11, 13, 14]]
    return model, prompts, [images(2), images(1, seed=3), images(1, seed=5)]


def test_no_repeat_ngram_size_bans_repeated_ngrams(text_model):
    generated = torch.tensor([[1, 2, 3, 1, 2], [0, 0, 0, 0, 0]])
    assert repeated_ngram_tokens(generated, 3, V)[0].nonzero().flatten().tolist() == [3]
    assert repeated_ngram_tokens(generated, 2, V)[0].nonzero().flatten().tolist() == [3]
    assert repeated_ngram_tokens(generated, 1, V)[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert repeated_ngram_tokens(generated, 2, V)[1].nonzero().flatten().tolist() == [0]
    assert not repeated_ngram_tokens(generated[:, :2], 3, V).any()

    def bigrams(row):
        return list(zip(row, row[1:]))

    free = generate(text_model, PROMPTS, max_new_tokens=12)
    assert any(len(set(bigrams(row))) < len(bigrams(row)) for row in free)  # it does repeat without the ban
    for num_beams in (1, 3):
        for row in generate(text_model, PROMPTS, max_new_tokens=12, num_beams=num_beams, no_repeat_ngram_size=2):
            assert len(row) == 12 and len(set(bigrams(row))) == len(bigrams(row)), row


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    """Generated tokens' logits are divided by the penalty when positive, multiplied when negative."""
    def run(logits, penalty, num_beams=1, steps=4):
        rows = logits.expand(num_beams, -1)
        config = SamplingConfig(max_new_tokens=steps, num_beams=num_beams, repetition_penalty=penalty)
        return decode(lambda tokens: rows, rows, config, reorder=lambda rows: None)[0]

    positive = torch.tensor([0.0, 2.0, 1.5, -1.0])
    assert run(positive, 1.0) == [1, 1, 1, 1]
    assert run(positive, 2.0) == [1, 2, 1, 1]  # 2.0 / 2 < 1.5, then 1.5 / 2 < 2.0 / 2
    negative = torch.tensor([-3.0, -1.0, -1.5, -2.5])
    assert run(negative, 1.0, steps=3) == [1, 1, 1]
    assert run(negative, 2.0, steps=3) == [1, 2, 1]  # -1.0 * 2 < -1.5, then -1.5 * 2 < -1.0 * 2
    # The beams' log-probs come from the penalised logits too.
    assert run(positive, 1.0, num_beams=2) == [1, 1, 1, 1]
    assert len(set(run(positive, 2.0, num_beams=2))) > 1


def test_repetition_penalty_spares_the_prompt_and_reduces_repeats(text_model):
    first = generate(text_model, [[1]], max_new_tokens=1)[0][0]
    prompt = [first] * 4
    assert generate(text_model, [prompt], max_new_tokens=1, repetition_penalty=10.0)[0][0] == \
        generate(text_model, [prompt], max_new_tokens=1)[0][0]  # prompt tokens are not penalised

    def repeats(rows):
        return sum(len(row) - len(set(row)) for row in rows)

    for num_beams in (1, 3):
        plain = generate(text_model, PROMPTS, max_new_tokens=6, num_beams=num_beams)
        penalised = generate(text_model, PROMPTS, max_new_tokens=6, num_beams=num_beams, repetition_penalty=3.0)
        assert repeats(penalised) < repeats(plain)


def test_bad_options():
    with pytest.raises(ValueError, match="num_beams"):
        SamplingConfig(num_beams=0)
    with pytest.raises(ValueError, match="temperature 0"):
        SamplingConfig(num_beams=2, temperature=1.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        SamplingConfig(no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="reorder"):
        decode(lambda t: None, torch.zeros(2, 4), SamplingConfig(num_beams=2))
    with pytest.raises(ValueError, match="whole number"):
        beam_search(lambda t: None, torch.zeros(3, 4), SamplingConfig(num_beams=2), reorder=lambda r: None)
