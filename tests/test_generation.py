"""Decoding against transformers' generate, and the cache/batching invariants."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlm.checkpoints import load_llama
from vlm.generation import SamplingConfig, generate, sample_next


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=128, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)  # sharper distributions: greedy choices far from ties
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return hf, load_llama(path).eval()


PROMPTS = [[5, 17, 42, 8, 99, 3, 1], [7, 7, 60], [12, 40, 33, 21, 90]]


def test_greedy_equals_transformers(pair):
    hf, ours = pair
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
        got = generate(ours, [prompt], max_new_tokens=20)[0]
        assert got == ref[0, len(prompt):].tolist()


def test_cached_equals_uncached_and_batched_equals_single(pair):
    _, ours = pair
    single = [generate(ours, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert generate(ours, PROMPTS, max_new_tokens=12, pad_id=0) == single
    assert generate(ours, PROMPTS, max_new_tokens=12, use_cache=False) == single


def test_stop_tokens_end_each_row(pair):
    _, ours = pair
    free = generate(ours, PROMPTS, max_new_tokens=12)
    stop = free[0][3]
    stopped = generate(ours, PROMPTS, max_new_tokens=12, stop_tokens=[stop])
    for row_free, row_stopped in zip(free, stopped):
        cut = row_free.index(stop) if stop in row_free else len(row_free)
        assert row_stopped == row_free[:cut]


def test_sampling_is_seeded_and_respects_top_k(pair):
    _, ours = pair
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=3)
    a = generate(ours, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(ours, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    assert a == b


def test_top_k_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert picks == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.087, ...
    assert probs[0] < 0.7 < probs[0] + probs[1]
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)) for _ in range(100)}
    assert picks == {0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_synced_decoding_keeps_stepping_until_every_rank_is_done():
    """A rank whose rows are finished keeps stepping (its tokens dropped) while `all_finished` says
    another rank still decodes: the same number of model steps on every rank."""
    from vlm.generation import decode

    vocab, stop = 8, 7
    steps = []

    def step(token):
        steps.append(token)
        return torch.nn.functional.one_hot(torch.tensor([stop]), vocab).float()  # always the stop token next

    first = torch.nn.functional.one_hot(torch.tensor([3]), vocab).float()
    config = SamplingConfig(max_new_tokens=10, stop_tokens=(stop,))
    assert decode(step, first, config) == [[3]] and len(steps) == 1  # alone: stops when its row is done
    steps.clear()
    others_done_after = iter([False, False, False, True])  # another rank needs 4 more steps
    out = decode(step, first, config, all_finished=lambda local: local and next(others_done_after))
    assert out == [[3]] and len(steps) == 4
    steps.clear()
    assert decode(step, first, config, all_finished=lambda local: False) == [[3]] and len(steps) == 9  # capped


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5])
def test_beam_search_equals_transformers(pair, length_penalty):
    """Same hypotheses, same scores (the stop token counts in the length), same best as transformers'
    beam search with early_stopping="never"; theirs runs on until all its kept hypotheses are final."""
    hf, ours = pair
    free = generate(ours, PROMPTS, max_new_tokens=10, num_beams=4)
    stops = sorted({row[2] for row in free} - {0})  # tokens the beams meet: some hypotheses finish early
    lengths = []
    for prompt in PROMPTS:
        for stop in [None, *stops]:
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, num_beams=4, do_sample=False,
                              length_penalty=length_penalty, early_stopping="never", pad_token_id=0,
                              eos_token_id=stop)[0, len(prompt):].tolist()
            ref = ref[: ref.index(stop)] if stop in ref else ref
            got = generate(ours, [prompt], max_new_tokens=10, num_beams=4, stop_tokens=[] if stop is None else [stop],
                           length_penalty=length_penalty)[0]
            assert got == ref, (prompt, stop)
            lengths.append(len(got))
    assert min(lengths) < 10 == max(lengths)
