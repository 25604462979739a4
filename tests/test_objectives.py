import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlm.objectives import (
    LOGPS_REDUCTION,
    PREFERENCE_METRICS,
    logps_for_loss,
    preference_loss,
    sequence_logprobs,
    sequence_logprobs_from_hidden,
)

IGNORE = -100
LOSSES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)]


def _labels(rows: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Random labels, about half ignored; row 1 has nothing scored, row 0 a label at t=0 only besides."""
    labels = torch.randint(vocab, (rows, length), generator=gen)
    labels[torch.rand(rows, length, generator=gen) < 0.5] = IGNORE
    labels[1] = IGNORE
    labels[0, 0] = 3  # never scored: nothing predicts the first token
    return labels


def _brute_force(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    sums, counts = [], []
    for row_logits, row in zip(logits.double(), labels.tolist()):
        total, count = 0.0, 0
        for t in range(len(row) - 1):
            if row[t + 1] != IGNORE:
                total += float(torch.log_softmax(row_logits[t], -1)[row[t + 1]])
                count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def _naive_loss(pc, pr, rc, rr, *, beta: float, loss_type: str, eps: float) -> torch.Tensor:
    """Pair by pair, from the papers' formulas (sigmoid written out, no logsigmoid)."""
    total = 0.0
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            p = 1.0 / (1.0 + torch.exp(-beta * h))  # model's probability that chosen is preferred
            total = total - (1.0 - eps) * torch.log(p) - eps * torch.log(1.0 - p)
        else:
            total = total + (h - 1.0 / (2.0 * beta)) ** 2
    return total / len(pc)


def _pairs(batch: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(batch, generator=gen, dtype=dtype)).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("loss_type,eps", LOSSES)
def test_preference_loss_matches_naive_loop_in_value_and_gradient(loss_type, eps):
    pc, pr, rc, rr = _pairs(6)
    beta = 0.3
    ours = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    naive = _naive_loss(pc, pr, rc.detach(), rr.detach(), beta=beta, loss_type=loss_type, eps=eps)
    torch.testing.assert_close(ours.loss, naive, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(ours.loss, [pc, pr])
    want = torch.autograd.grad(naive, [pc, pr])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    if loss_type == "sigmoid" and not eps:  # plain DPO always pushes chosen up and rejected down
        assert (got[0] < 0).all() and (got[1] > 0).all()
    assert torch.autograd.grad(ours.loss, [rc, rr], allow_unused=True) == (None, None)  # the reference is frozen


def test_preference_loss_hand_checked_two_pairs():
    # pair 0: h = (-3 + 5) - (-4 + 6) = 0; pair 1: h = (-2 + 12) - (-4 + 4) = 10; beta * h = 0 and 1
    pc, pr = torch.tensor([-3.0, -2.0]), torch.tensor([-5.0, -12.0])
    rc, rr = torch.tensor([-4.0, -4.0]), torch.tensor([-6.0, -4.0])
    out = preference_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(out.loss, torch.tensor((math.log(2) + math.log1p(math.exp(-1))) / 2))
    torch.testing.assert_close(out.loss, torch.tensor(0.5032044))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([0.1, -0.8]))
    torch.testing.assert_close(out.margins, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out.accuracies, torch.tensor([0.0, 1.0]))  # a tie is not a win
    # label smoothing 0.1: h = 0 stays log 2; pair 1 is 0.9 log(1 + e^-1) + 0.1 log(1 + e)
    smooth = preference_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(smooth.loss, torch.tensor((0.6931472 + 0.4132617) / 2))
    # IPO with beta 0.1 targets h = 5: both pairs are 5 away
    torch.testing.assert_close(preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo").loss, torch.tensor(25.0))
    metrics = out.metrics()
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"} == set(PREFERENCE_METRICS.values()) - {"nll_loss"}
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor(0.5))
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor(-8.5))


def test_logps_for_loss_sums_for_dpo_and_averages_for_ipo():
    sums, counts = torch.tensor([-6.0, 0.0, -3.0]), torch.tensor([3, 0, 1])
    assert LOGPS_REDUCTION == {"sigmoid": "sum", "ipo": "mean"}
    assert logps_for_loss(sums, counts, loss_type="sigmoid") is sums
    torch.testing.assert_close(logps_for_loss(sums, counts, loss_type="ipo"), torch.tensor([-2.0, 0.0, -3.0]))


def test_sequence_logprobs_matches_a_loop_over_positions():
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4, 9, 13, generator=gen)
    labels = _labels(4, 9, 13, gen)
    sums, counts = sequence_logprobs(logits, labels)
    want_sums, want_counts = _brute_force(logits, labels)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert counts.tolist() == want_counts and want_counts[1] == 0
    torch.testing.assert_close(sums, torch.tensor(want_sums, dtype=torch.float32), rtol=1e-6, atol=1e-5)
    half = sequence_logprobs(logits.bfloat16(), labels)[0]  # low-precision logits are normalised in float32
    assert half.dtype == torch.float32


@pytest.mark.parametrize("chunk_size,recompute", [(1, True), (3, True), (3, False), (None, True)])
def test_from_hidden_equals_logits_version_in_value_and_gradient(chunk_size, recompute):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 7, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = _labels(4, 7, 11, gen)
    upstream = torch.randn(4, generator=gen)  # a non-uniform gradient per row
    want, want_counts = sequence_logprobs(hidden @ weight.T, labels)
    want_grads = torch.autograd.grad((want * upstream).sum(), [hidden, weight])
    got, counts = sequence_logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size, recompute=recompute)
    got_grads = torch.autograd.grad((got * upstream).sum(), [hidden, weight])
    assert torch.equal(counts, want_counts) and counts[1] == 0 and counts.sum() > 3  # several chunks
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-5)
    assert got_grads[0][1].abs().sum() == 0  # the unscored row gets no gradient


def test_from_hidden_with_nothing_scored_or_no_grad():
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    sums, counts = sequence_logprobs_from_hidden(hidden, weight, torch.full((2, 5), IGNORE), chunk_size=2)
    assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    sums.sum().backward()  # still part of the graph: a zero gradient, not an error
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    with torch.no_grad():  # the reference model's pass
        ref, _ = sequence_logprobs_from_hidden(hidden, weight, torch.randint(6, (2, 5)), chunk_size=2)
    assert ref.grad_fn is None and ref.shape == (2,)


def _good_pairs() -> dict:
    x = torch.zeros(3)
    return {"policy_chosen": x, "policy_rejected": x, "reference_chosen": x, "reference_rejected": x}


@pytest.mark.parametrize("change,match", [
    ({"beta": 0.0}, "beta"),
    ({"beta": -1.0}, "beta"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"loss_type": "hinge"}, "loss_type"),
    ({"reference_rejected": torch.zeros(4)}, "reference_rejected"),
    ({"policy_rejected": torch.zeros(3, 1)}, "policy_rejected"),
    ({"reference_chosen": torch.zeros(3, dtype=torch.long)}, "reference_chosen"),
    ({"policy_chosen": torch.zeros(0), "policy_rejected": torch.zeros(0),
      "reference_chosen": torch.zeros(0), "reference_rejected": torch.zeros(0)}, "policy_chosen"),
])
def test_preference_loss_refuses_bad_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(**{**_good_pairs(), **change})


def test_logprob_functions_refuse_bad_arguments():
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(torch.zeros(2, 4, 6), labels)
    with pytest.raises(ValueError, match="weight"):
        sequence_logprobs_from_hidden(torch.zeros(2, 5, 4), torch.zeros(6, 3), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs_from_hidden(torch.zeros(2, 5, 4), torch.zeros(6, 4), labels, chunk_size=0)
    with pytest.raises(ValueError, match="loss_type"):
        logps_for_loss(torch.zeros(2), torch.ones(2), loss_type="dpo")


# --- TRL's own code, when installed ----------------------------------------------------------


@pytest.fixture(scope="module")
def trl_dpo():
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this TRL has no DPOTrainer._compute_loss(model, inputs, return_outputs)")
    return DPOTrainer._compute_loss, selective_log_softmax


def test_sequence_logprobs_matches_trl_selective_log_softmax(trl_dpo):
    _, selective_log_softmax = trl_dpo
    gen = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(3, 6, 10, generator=gen), _labels(3, 6, 10, gen)
    shifted = labels[:, 1:]  # TRL: logits[:, :-1] score labels[:, 1:]
    per_token = selective_log_softmax(logits[:, :-1], shifted.clamp(min=0)) * (shifted != IGNORE)
    torch.testing.assert_close(sequence_logprobs(logits, labels)[0], per_token.sum(1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_preference_loss_matches_trl_dpo_trainer(trl_dpo, loss_type):
    """TRL's DPOTrainer loss (run on a stand-in model that returns given per-token log-probs)
    against ours on `logps_for_loss` of the same tokens: loss, gradient, and logged metrics."""
    compute_loss, _ = trl_dpo
    gen = torch.Generator().manual_seed(4)
    pairs, length, beta = 3, 9, 0.2
    completion = torch.zeros(2 * pairs, length, dtype=torch.long)  # rows: chosen answers, then rejected
    for row, (start, end) in enumerate([(2, 9), (3, 5), (4, 8), (2, 4), (5, 9), (3, 8)]):
        completion[row, start:end] = 1  # answers of different lengths after a prompt, then padding
    scored = completion[:, 1:].bool()
    token_logps = (-3 * torch.rand(2 * pairs, length - 1, generator=gen)).requires_grad_()
    ref_sums = -10 * torch.rand(2 * pairs, generator=gen)

    def model(**kwargs):
        zeros = torch.zeros(2 * pairs, length - 1)
        return SimpleNamespace(log_probs=token_logps * scored, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), aux_loss=None)

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
    )
    inputs = {"input_ids": torch.randint(20, (2 * pairs, length), generator=gen), "completion_mask": completion,
              "attention_mask": torch.ones(2 * pairs, length, dtype=torch.long),
              "ref_chosen_logps": ref_sums[:pairs], "ref_rejected_logps": ref_sums[pairs:]}
    trl_loss = compute_loss(trainer, model, inputs, False)
    trl_grad, = torch.autograd.grad(trl_loss, token_logps)

    counts = scored.sum(1)
    policy = logps_for_loss((token_logps * scored).sum(1), counts, loss_type=loss_type)
    reference = logps_for_loss(ref_sums, counts, loss_type=loss_type)
    ours = preference_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:],
                           beta=beta, loss_type=loss_type)
    our_grad, = torch.autograd.grad(ours.loss, token_logps)
    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-6, atol=1e-6)
    if loss_type == "sigmoid":  # for IPO TRL logs rewards of summed log-probs, we of the averaged inputs
        logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        for name, value in ours.metrics().items():
            assert value.item() == pytest.approx(logged[name], rel=1e-6, abs=1e-6), name
