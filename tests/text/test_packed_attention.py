"""Packed rows in the Llama: sample_ids [B, T] give each sample its own causal attention and
positions, so a packed row computes exactly what its samples compute one by one (reference: each
sample run alone, plain causal attention), on both kernels (boolean-mask SDPA and FlexAttention)."""

import pytest
import torch
import torch.nn.functional as F

from vlm.text.llama import Llama, LlamaConfig, sample_starts

LENGTHS = [[5, 9, 3], [12, 6]]  # samples of each packed row; rows padded to WIDTH
WIDTH = 20
KERNELS = ["sdpa", "segments", "flex"]
# FlexAttention has no backward on CPU (torch 2.14): its gradients are checked on CUDA only.
TRAINING = [("sdpa", "cpu"), ("segments", "cpu"), pytest.param("flex", "cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA"))]


def tiny(kernel: str, device: str = "cpu") -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=96, max_seq_len=64))
    model.packed_attention = kernel
    return model.to(device)


def samples(seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(1, 50, (n,), generator=g) for n in row] for row in LENGTHS]


def pack(rows: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, sample_ids [B, WIDTH]: samples one after the other, then padding (id 0, sample 0)."""
    ids = torch.zeros(len(rows), WIDTH, dtype=torch.long)
    sample_ids = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        joined = torch.cat(row)
        ids[r, : len(joined)] = joined
        sample_ids[r, : len(joined)] = torch.cat([torch.full((len(s),), n) for n, s in enumerate(row, 1)])
    return ids, sample_ids


def spans(rows):
    """(row, start, end, sample) of every sample."""
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            yield r, start, start + len(sample), sample
            start += len(sample)


def sample_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one sample's logits [n, V] on its own tokens [n]."""
    return F.cross_entropy(logits[:-1], tokens[1:])


def test_sample_starts():
    ids = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert sample_starts(ids).tolist() == [[0, 0, 0, 3, 3, 5, 6, 6], [0] * 8]


@pytest.mark.parametrize(("kernel", "device"), TRAINING)
def test_packed_rows_equal_samples_one_by_one_logits_and_gradients(kernel, device):
    model = tiny(kernel, device)
    rows = [[sample.to(device) for sample in row] for row in samples()]
    ids, sample_ids = (t.to(device) for t in pack(rows))
    logits = model(ids, sample_ids=sample_ids)
    packed_loss = sum(sample_loss(logits[r, a:b], s) for r, a, b, s in spans(rows))
    packed_loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    alone_loss = 0.0
    for r, a, b, sample in spans(rows):
        alone = model(sample[None])[0]  # no mask: plain causal, positions from 0
        torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=0)
        alone_loss = alone_loss + sample_loss(alone, sample)
    alone_loss.backward()
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_no_attention_crosses_a_sample_boundary(kernel):
    model, rows = tiny(kernel), samples()
    ids, sample_ids = pack(rows)
    changed = [list(row) for row in rows]
    changed[0][1] = torch.randint(1, 50, (len(rows[0][1]),), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(ids, sample_ids=sample_ids)
        after = model(pack(changed)[0], sample_ids=sample_ids)
    differs = (before - after).abs().amax(-1)  # [B, T]
    assert (differs[0, 5:14] > 1e-3).all(), "the perturbed sample changes"
    assert differs[0, :5].max() == 0 and differs[0, 14:17].max() == 0, "its neighbours in the row do not"
    assert differs[1].max() == 0


@torch.no_grad()
@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_logits_equal_samples_one_by_one(kernel):
    model, rows = tiny(kernel), samples(5)
    ids, sample_ids = pack(rows)
    logits = model(ids, sample_ids=sample_ids)
    for r, a, b, sample in spans(rows):
        torch.testing.assert_close(logits[r, a:b], model(sample[None])[0], atol=1e-5, rtol=0)


def test_kernels_agree_and_padding_does_not_leak():
    rows = samples(3)
    ids, sample_ids = pack(rows)
    with torch.no_grad():
        sdpa, flex = tiny("sdpa")(ids, sample_ids=sample_ids), tiny("flex")(ids, sample_ids=sample_ids)
        segments = tiny("segments")(ids, sample_ids=sample_ids)
        noisy = ids.clone()
        noisy[sample_ids == 0] = 7  # other padding tokens: real tokens' logits unchanged
        other = tiny("sdpa")(noisy, sample_ids=sample_ids)
    real = sample_ids > 0
    torch.testing.assert_close(sdpa[real], flex[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa, segments, atol=1e-5, rtol=0)  # padding too: one more sample
    assert torch.equal(sdpa[real], other[real])


def test_packed_context_errors():
    model = tiny("sdpa")
    with pytest.raises(ValueError, match="packed rows .sample_ids. are for training"):
        model.context(4, sample_ids=torch.ones(1, 4, dtype=torch.long), cache=model.new_cache(1, 8))
    model.packed_attention = "fast"
    with pytest.raises(ValueError, match=r"Llama.packed_attention must be one of \('auto', 'compiled', 'flex', 'sdpa', 'segments'\), got"):
        model(torch.ones(1, 4, dtype=torch.long), sample_ids=torch.ones(1, 4, dtype=torch.long))


def test_auto_kernel_on_cpu_is_per_sample_and_the_sdpa_mask_is_block_diagonal():
    ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    auto = tiny("auto").context(6, sample_ids=ids)
    assert auto.segments == [[0, 2, 5, 6], [0, 6]] and auto.mask is None and auto.block_mask is None
    compiled = tiny("compiled").context(6, sample_ids=ids)  # on CPU: the mask, nothing read on the host
    assert compiled.segments is None and compiled.block_mask is None and compiled.mask.shape == (2, 1, 6, 6)
    model = tiny("sdpa")
    ctx = model.context(6, sample_ids=ids[:1])
    assert ctx.block_mask is None and not ctx.is_causal
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(ctx.mask[0, 0], expected)


def test_masks_without_packing_need_no_host_value():
    """An attention mask (or a cache) always gives a boolean mask, also when nothing is padded (the
    old fast path read the mask on the host); without either, the is_causal path."""
    model = tiny("sdpa")
    plain = model.context(4)
    assert plain.is_causal and plain.mask is None
    masked = model.context(4, attention_mask=torch.ones(2, 4, dtype=torch.long))
    assert not masked.is_causal and torch.equal(masked.mask[:, 0], torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 4, 4))
    ids = torch.randint(1, 50, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long)), model(ids), atol=1e-6, rtol=0)
    cache = model.new_cache(2, 8)
    model.context(4, cache=cache)
    step = model.context(1, cache=cache)
    assert not step.is_causal and step.mask.shape == (2, 1, 1, 5) and step.mask.all()


def test_packed_rows_through_compiled_layers_without_graph_breaks():
    """The 'compiled' kernel (what compiled blocks use): whole-graph layers give the eager logits."""
    model, rows = tiny("compiled"), samples(2)
    ids, sample_ids = pack(rows)
    with torch.no_grad():
        eager = model(ids, sample_ids=sample_ids)
        for layer in model.layers:
            layer.forward = torch.compile(layer.forward, backend="eager", fullgraph=True)
        compiled = model(ids, sample_ids=sample_ids)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
