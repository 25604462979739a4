"""vlm evaluate-context: the passkey generator, scoring against fake models with known answers
(a perfect copier, a constant guesser, uniform and oracle predictors), and the command end to end."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from vlm.cli import main
from vlm.eval.context import (DEPTHS, DIGITS, evaluate_context, passkey_sample, passkey_samples, perplexity,
                              score_passkey)

VOCAB = 256


class Chars:
    """One token per character (code points < 256): digits are single tokens, so per-digit chance is exact."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def copier(n: int = 12):
    """Predicts the token that followed the latest earlier occurrence of the last `n` tokens (an
    induction head with perfect recall); token 0 where there is none."""

    def logits_fn(ids):
        T = ids.shape[1]
        grams = torch.stack([torch.roll(ids[0], k) for k in range(n)], -1)  # [T, n]: ids[t-k]
        same = (grams[:, None] == grams[None]).all(-1) & torch.ones(T, T, dtype=torch.bool).tril(-1)
        same[:, : n - 1] = False  # rolled-around grams are not real
        source = torch.where(same, torch.arange(T), -1).max(-1).values  # [T]
        guess = torch.where(source >= 0, ids[0, (source + 1).clamp(max=T - 1)], 0)
        return torch.nn.functional.one_hot(guess, VOCAB).float()[None]

    return logits_fn


def constant(token: int):
    return lambda ids: torch.nn.functional.one_hot(torch.full(ids.shape, token), VOCAB).float()


def test_generator_is_deterministic_and_places_the_key():
    tok = Chars()
    first = passkey_samples(tok, 700, trials=3, seed=1)
    assert first == passkey_samples(tok, 700, trials=3, seed=1)
    assert [s.passkey for s in first] != [s.passkey for s in passkey_samples(tok, 700, trials=3, seed=2)]
    assert len(first) == 15 and all(650 < len(s.ids) <= 700 for s in first)
    for sample in first:
        text = tok.decode(sample.ids)
        assert tok.decode(sample.ids[sample.answer_start:]) == sample.passkey and len(sample.passkey) == DIGITS
        where = text.index(f"The pass key is {sample.passkey}.") / len(text)
        assert abs(where - sample.depth) < 0.3  # depth 0 near the start, 1 near the question
    assert text.endswith(f"What is the pass key? The pass key is {sample.passkey}")


def test_perfect_copier_scores_100_and_constant_scores_chance():
    tok = Chars()
    samples = passkey_samples(tok, 400, trials=8, seed=0)
    perfect = score_passkey(copier(), tok, samples)
    assert perfect["accuracy"] == 1.0 and perfect["digit_accuracy"] == 1.0
    assert set(perfect["by_depth"].values()) == {1.0}
    # A model that always says "7": no key is all sevens here, and it is right on ~1 digit in 10.
    guesser = score_passkey(constant(ord("7")), tok, samples)
    assert guesser["accuracy"] == 0.0
    assert abs(guesser["digit_accuracy"] - 0.1) < 0.07  # 200 digits: 3 standard errors
    # The copier really reads the key: hide another number in the prompt and it fails.
    broken = [type(s)(s.ids[: s.answer_start] + tok.encode("99999"), s.answer_start, "99999", s.depth)
              for s in samples if s.passkey != "99999"]
    assert score_passkey(copier(), tok, broken)["accuracy"] == 0.0


def test_perplexity_of_uniform_and_oracle_predictors():
    tokens = list(range(100)) * 30
    uniform = perplexity(lambda ids: torch.zeros(*ids.shape, VOCAB), tokens, 128, windows=3)
    assert uniform["perplexity"] == pytest.approx(VOCAB, rel=1e-6) and uniform["windows"] == 3
    assert uniform["tokens"] == 3 * 127

    def oracle(ids):  # the next token, with certainty
        return 100 * torch.nn.functional.one_hot(torch.roll(ids, -1, 1), VOCAB).float()

    assert perplexity(oracle, tokens, 128)["perplexity"] == pytest.approx(1.0, abs=1e-6)
    report = evaluate_context(oracle, Chars(), tokens, [300, 600], trials=1)
    assert report["lengths"] == [300, 600] and report["chance"]["digit_accuracy"] == 0.1
    assert report["perplexity"]["600"]["windows"] == 4 and report["passkey"]["300"]["samples"] == 5


def test_command_end_to_end(tmp_path, model_dir, capsys):
    def run_cli(*args):
        code = main(["evaluate-context", *map(str, args)])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    (tmp_path / "held_out.txt").write_text("a red circle on a white background\n" * 200)
    common = ["--model", model_dir, "--lengths", 256, 384, "--text", tmp_path / "held_out.txt", "--trials", 1]
    done = run_cli(*common, "--out", tmp_path / "base")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "base" / "context.json").read_text())
    assert (tmp_path / "base" / "context.png").stat().st_size > 0 and report["rope_scaling"] is None
    assert set(report["passkey"]) == set(report["perplexity"]) == {"256", "384"}
    assert "length    384: passkey" in done.stdout
    yarn = '{"type": "yarn", "factor": 4, "original_max_position_embeddings": 64}'
    done = run_cli(*common, "--out", tmp_path / "yarn", "--rope-scaling", yarn)
    assert done.returncode == 0, done.stderr
    scaled = json.loads((tmp_path / "yarn" / "context.json").read_text())
    assert scaled["rope_scaling"]["type"] == "yarn"
    assert scaled["perplexity"]["384"]["perplexity"] != report["perplexity"]["384"]["perplexity"]
    bad = run_cli(*common, "--rope-scaling", '{"type": "ntk", "factor": 2}')
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "'ntk' is not one of" in bad.stderr


def test_prompts_and_windows_start_with_bos_when_the_tokenizer_has_one():
    class WithBos(Chars):
        bos_id = 1  # what vlm's tokenizers have: every training sample starts with it

    rng = random.Random("passkey/3/300")  # the stream passkey_samples(..., 300, seed=3) draws from
    plain = [passkey_sample(Chars(), 299, depth, rng) for depth in DEPTHS for _ in range(2)]  # one token less room
    for a, b in zip(plain, passkey_samples(WithBos(), 300, seed=3), strict=True):
        assert b.ids == [1] + a.ids and b.answer_start == a.answer_start + 1 and b.passkey == a.passkey
    seen = []
    tokens = list(range(2, 200))
    report = perplexity(lambda ids: seen.append(ids[0].tolist()) or torch.zeros(*ids.shape, VOCAB), tokens, 64,
                        windows=2, bos=[1])
    assert seen == [[1] + tokens[:63], [1] + tokens[63:126]] and report["tokens"] == 2 * 63
