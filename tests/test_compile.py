"""torch.compile: no graph breaks in a train step or a decoding step, regional compilation that
matches eager (also with activation checkpointing), and bad inputs refused before compiled code.

Tracing is cheap, code generation is not (minutes on a loaded CPU): the graph-break tests use
`torch._dynamo.explain` (tracing only) and the equality tests the `aot_eager` backend (Dynamo and
AOTAutograd trace forward and backward exactly as for inductor, then run the traced graphs
eagerly). One slow test runs inductor itself.
"""

import copy
import dataclasses
import os

import pytest
import torch
from tiny_models import IMAGE_ID, batch_from, images, open_gates

from vlm.model import build_model
from vlm.training.compile import compile_backend, compile_model, compile_statistics
from vlm.training.module import VLMModule
from vlm.training.parallel import apply_activation_checkpointing, blocks


def small_model(fusion: str):
    """tests/tiny_models.py's model with 2 decoder layers (tracing time grows with depth), gates
    open so that Flamingo's image path counts."""
    from tiny_models import tiny_model

    config = tiny_model(fusion).config
    config.text = dataclasses.replace(config.text, n_layers=2)
    torch.manual_seed(0)
    model = build_model(config).train()
    open_gates(model, 0.5)
    return model


def every_kind(model):
    """A text-only batch, and one batch with a text-only row, a caption, a chat turn (prompt
    unlearned) and an interleaved document."""
    text = batch_from(model, [[1, 2, 3, 4, 6], [7, 8, 9]], labels=True)
    rows = [[1, 2, 3], [1, IMAGE_ID, 3, 4], [2, IMAGE_ID, 7, 8, 9], [1, IMAGE_ID, 3, IMAGE_ID, 4, 6]]
    mixed = batch_from(model, rows, [[], images(1), images(1, 1), images(2, 2)], labels=True)
    first_answer = int((mixed.input_ids[2] == 7).nonzero()[0])
    mixed.labels[2, :first_answer] = -100  # the chat row learns its answer only
    return text, mixed


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_train_step_and_decode_step_have_no_graph_breaks(fusion):
    model = small_model(fusion)
    text, mixed = every_kind(model)

    def train_step(a, b):  # forward and loss of both batches, as one traced function
        return model(a, return_logits=False).loss + model(b, return_logits=False).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(train_step)(text, mixed)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1

    model.eval()
    with torch.no_grad():
        prompt = model._prompt_batch([images(2), images(1, 3)], [[1, IMAGE_ID, 9, IMAGE_ID], [2, IMAGE_ID, 3]], 0)
        cache = model.text.new_cache(2, prompt.input_ids.shape[1] + 4)
        _, state = model.hidden(prompt, cache=cache)
        token = torch.tensor([[3], [4]])
        model.decode_step(token, cache, state, None)  # the first step builds the position tables
        explained = torch._dynamo.explain(model.decode_step)(token, cache, state, None)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


def loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    loss = sum(model(b, return_logits=False).loss for b in batches)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("fusion", "checkpointing"), [("llava", False), ("flamingo", True)])
def test_regional_compile_matches_eager(fusion, checkpointing):
    """Each fusion compiled once (tracing dominates the test's time); activation checkpointing on
    the one with more kinds of blocks."""
    eager = small_model(fusion)
    batches = every_kind(eager)
    want_loss, want_grads = loss_and_grads(eager, batches)
    model = copy.deepcopy(eager)
    if checkpointing:
        apply_activation_checkpointing(blocks(model))
    assert compile_model(model, backend="aot_eager") == len(blocks(model))
    assert model.text.packed_attention == "compiled"  # packed rows: nothing read on the host in compiled layers
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]
    loss, grads = loss_and_grads(model, batches)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert compile_statistics()["compile/graphs"] > 0


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_bad_inputs_are_refused_before_the_compiled_model_runs(fusion, monkeypatch):
    model = small_model(fusion)
    compile_model(model, backend="aot_eager")
    monkeypatch.setattr(model.vision, "forward", lambda *a: pytest.fail("the tower ran on a bad batch"))
    per_image = model.tokens_per_image
    mismatch = batch_from(model, [[1, 2], [1, IMAGE_ID, 3]], [[], images(1)])
    mismatch.input_ids[1, -1] = IMAGE_ID  # one placeholder too many
    message = (rf"sample 1: {per_image + 1} image placeholder tokens but 1 image" if fusion == "llava"
               else r"sample 1: 2 <\|image\|> tokens but 1 image")
    with pytest.raises(ValueError, match=message):
        model(mismatch)
    if fusion == "flamingo":
        limit = model.fusion.options.max_images
        too_many = batch_from(model, [[1] + [IMAGE_ID] * (limit + 1)], [images(limit + 1)])
        with pytest.raises(ValueError, match=rf"a sample has more than max_images={limit} images"):
            model(too_many)


def test_compile_option_values():
    assert compile_backend(False) is None and compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ValueError, match="model.compile must be true, false or a torch.compile backend"):
        compile_backend("fastest")
    module = VLMModule(small_model("llava").config, compile="aot_eager", activation_checkpointing=True)
    module.configure_model()
    assert all(getattr(unit.forward, "_torchdynamo_orig_callable", None) is not None for unit in blocks(module.model))


DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh: cuda


@pytest.mark.skipif(DEVICE == "cpu" and not os.environ.get("VLM_TEST_INDUCTOR"),
                    reason="inductor's code generation takes minutes on a shared CPU (VLM_TEST_INDUCTOR=1 runs it); "
                           "scripts/gpu_check.sh runs it on CUDA")
def test_inductor_matches_eager_with_checkpointing():
    eager = small_model("llava").to(DEVICE)
    batches = [_to(b, DEVICE) for b in every_kind(eager)]
    want_loss, want_grads = loss_and_grads(eager, batches)
    model = copy.deepcopy(eager)
    apply_activation_checkpointing(blocks(model))
    compile_model(model)
    loss, grads = loss_and_grads(model, batches)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def _to(batch, device):
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def test_moe_feed_forward_compiles_whole_and_matches_eager():
    """Without a capacity the eager dispatch pads to the largest load (read on the host); compiled,
    to a static bound. Same outputs, losses and loads."""
    from vlm.text.moe import MoEConfig, MoEFeedForward

    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=2, capacity_factor=None, z_loss_coef=1e-3)
    layer = MoEFeedForward(16, config, hidden_dim=32).train()
    x = torch.randn(2, 7, 16, requires_grad=True)
    want = layer(x)
    want_aux, want_load = layer.aux_loss, layer.last_load
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # a graph break is an error
    got = compiled(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.aux_loss, want_aux)
    assert torch.equal(layer.last_load, want_load) and int(want_load.sum()) == 2 * 14


def test_recompiles_are_counted_and_stop_once_the_length_is_dynamic():
    model = small_model("llava")
    compile_model(model, backend="aot_eager")
    torch._dynamo.reset()
    seen = []
    for length in (4, 6, 8, 10):  # text-only rows: only the decoder layer's code compiles
        batch = batch_from(model, [[1, 2, 3, 4, 6, 7, 8, 9, 10, 11][:length]], labels=True)
        model(batch, return_logits=False).loss.backward()
        seen.append(compile_statistics())
    # length 4: one graph; length 6 fails its guard and recompiles with a dynamic length; then no more
    assert [s["compile/graphs"] - seen[0]["compile/graphs"] for s in seen] == [0, 1, 1, 1]
    assert [s["compile/recompiles"] for s in seen] == [0, 1, 1, 1]


@pytest.mark.skipif(DEVICE == "cpu" and not os.environ.get("VLM_TEST_INDUCTOR"),
                    reason="inductor's code generation takes minutes on a shared CPU (VLM_TEST_INDUCTOR=1 runs it); "
                           "scripts/gpu_check.sh runs it on CUDA")
@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_compiled_decode_step_gives_the_same_greedy_tokens(fusion):
    model = small_model(fusion).eval().to(DEVICE)
    prompts = [[1, IMAGE_ID, 9, 10, IMAGE_ID, 12], [2, IMAGE_ID, 3]]
    imgs = [[i.to(DEVICE) for i in images(2)], [i.to(DEVICE) for i in images(1, seed=3)]]
    eager = model.generate(imgs, prompts, max_new_tokens=10)
    assert model.generate(imgs, prompts, max_new_tokens=10, compile_step=True) == eager
    assert model.generate(imgs, prompts, max_new_tokens=10, use_cache=False) == eager
