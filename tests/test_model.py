"""VisionLanguageModel: stages and gradients, the backbone stays a plain Llama, user fusions."""

from dataclasses import dataclass

import pytest
import torch
from tiny_models import IMAGE_ID, VOCAB, batch_from, images, open_gates, tiny_model

import vlm.fusion
from vlm.checkpoints import save_llama_hf
from vlm.fusion import FusionConfig, list_fusions
from vlm.stages import set_trainable
from vlm.text.llama import Llama

ROWS = [[1, IMAGE_ID, 8, 9, 10, 11], [2, 3, IMAGE_ID, 12, IMAGE_ID, 13, 14]]


def _batch(model):
    return batch_from(model, ROWS, [images(1), images(2, seed=1)], labels=True)


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
@pytest.mark.parametrize("stage", ["align", "instruct", "full"])
def test_gradients_reach_exactly_the_trainable_parts(fusion, stage):
    model = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(model, 0.5)  # closed gates would block gradients into the resampler
    table = set_trainable(model, stage)
    model.train()
    loss = model(_batch(model), return_logits=False).loss
    loss.backward()
    trained = {"align": {"fusion"}, "instruct": {"fusion", "text"}, "full": {"fusion", "text", "vision"}}[stage]
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if part in trained and p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # Every part that trains has non-zero gradients somewhere, and the table agrees with the flags.
    for part in trained:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(part))
        assert table.rows[part][0] > 0
    assert table.rows.get("vision", (0, 1))[0] == (0 if "vision" not in trained else table.rows["vision"][0])
    assert model.vision.training == ("vision" in trained)


def test_include_exclude_globs():
    model = tiny_model("llava")
    table = set_trainable(model, "align", include=["text.norm.*"], exclude=["fusion.projector.0.*"])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags["text.norm.weight"] and not flags["fusion.projector.0.weight"] and flags["fusion.projector.2.weight"]
    assert table.rows["text"][0] == 64
    with pytest.raises(ValueError, match="matches no parameter"):
        set_trainable(model, include=["txt.*"])
    with pytest.raises(ValueError, match="unknown stage"):
        set_trainable(model, "pretrain")


def test_loss_with_and_without_logits_agree():
    model = tiny_model("llava")
    batch = _batch(model)
    with torch.no_grad():
        out = model(batch)
        fast = model(batch, return_logits=False)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    assert fast.logits is None and torch.equal(fast.loss, out.loss)


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_text_backbone_stays_a_plain_llama(tmp_path, fusion):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(fusion)
    plain = Llama(model.config.text)
    plain.load_state_dict(model.text.state_dict(), strict=True)
    save_llama_hf(model.text, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, plain(ids), atol=1e-5, rtol=1e-5)


def test_load_text_backbone_grows_the_vocabulary(tmp_path):
    model = tiny_model("llava")
    small = Llama(type(model.config.text)(**{**model.config.text.to_dict(), "vocab_size": VOCAB - 1}))
    save_llama_hf(small, tmp_path)
    model.load_text_backbone(tmp_path)
    emb = model.text.tok_embeddings.weight
    torch.testing.assert_close(emb[: VOCAB - 1], small.tok_embeddings.weight, atol=0, rtol=0)
    torch.testing.assert_close(emb[-1], small.tok_embeddings.weight.mean(0), atol=1e-6, rtol=1e-6)
    wrong = Llama(type(model.config.text)(**{**model.config.text.to_dict(), "n_layers": 2}))
    save_llama_hf(wrong, tmp_path / "wrong")
    with pytest.raises(ValueError, match="n_layers: model 4 vs checkpoint 2"):
        model.load_text_backbone(tmp_path / "wrong")


def test_a_mixtral_backbone_loads_whatever_the_balancing(tmp_path):
    """Training-only MoE settings (loss coefficients, bias balancing) do not decide the weights:
    a Mixtral-layout backbone (aux loss, no bias) loads into a model balanced by a bias, which
    starts at zero, and computes the same text logits."""
    import dataclasses

    from vlm.model import build_model
    from vlm.text.moe import MoEConfig

    config = tiny_model("llava").config
    moe = MoEConfig(num_experts=4, top_k=2)
    mixtral = Llama(dataclasses.replace(config.text, moe=moe)).eval()
    save_llama_hf(mixtral, tmp_path)
    biased = dataclasses.replace(moe, balance="bias", aux_loss_coef=0.0, bias_update_rate=0.01)
    model = build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, moe=biased))).eval()
    model.load_text_backbone(tmp_path)
    biases = [b for name, b in model.text.named_buffers() if name.endswith("expert_bias")]
    assert len(biases) == 4 and all(not b.any() for b in biases)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.text(ids), mixtral(ids), atol=1e-6, rtol=1e-6)
    fewer = build_model(dataclasses.replace(config, text=dataclasses.replace(
        config.text, moe=dataclasses.replace(moe, num_experts=2))))
    with pytest.raises(ValueError, match="moe: model"):
        fewer.load_text_backbone(tmp_path)


def test_user_defined_fusion_trains_one_step():
    @dataclass
    class MeanOptions:
        scale: float = 1.0

    @vlm.fusion.register("mean_prefix")
    class MeanPrefixFusion(vlm.fusion.Fusion):
        """Adds the projected mean image feature of a row to every token of that row."""

        Options = MeanOptions

        def __init__(self, options, *, text, vision_dim, vision_tokens, image_token_id):
            super().__init__(options, text=text, vision_dim=vision_dim, vision_tokens=vision_tokens, image_token_id=image_token_id)
            self.proj = torch.nn.Linear(vision_dim, text.dim)

        @property
        def tokens_per_image(self):
            return 1

        def prepare(self, features, batch, state=None):
            if state is not None:
                return state
            out = torch.zeros(batch.input_ids.shape[0], self.text_dim)
            if features is not None:
                out = out.index_add(0, batch.image_sample_index, self.proj(features.mean(1)))
            return out * self.options.scale

        def embed(self, h, state):
            return h + state[:, None]

    assert "mean_prefix" in list_fusions()
    model = tiny_model("mean_prefix", scale=0.5)
    assert isinstance(model.config.fusion, FusionConfig)
    set_trainable(model, "align")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.fusion.proj.weight.detach().clone()
    model.train()
    batch = _batch(model)
    loss = model(batch, return_logits=False).loss
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.fusion.proj.weight)
    assert model.generate([images(1)], [[1, IMAGE_ID, 3]], max_new_tokens=3)


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_blank_image_for_text_only_batches_changes_nothing_but_touches_every_parameter(fusion):
    model = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(model, 0.5)
    set_trainable(model, "full")
    batch = batch_from(model, [[1, 2, 3, 4], [7, 8, 9]], labels=True)
    with torch.no_grad():
        plain = model(batch).logits
    model.blank_image_when_missing = True
    out = model(batch)
    assert torch.equal(out.logits, plain)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_take_rows_reorders_every_per_row_tensor_of_a_fusion_state():
    """Beam search moves each beam's fusion state to its rows: tensors whose first dimension is the
    batch, inside dataclasses, dicts and tuples (Flamingo's latents, media index, cross keys/values)."""
    from vlm.fusion.flamingo import FlamingoState
    from vlm.model import take_rows

    rows = torch.tensor([1, 1, 0])
    media, index, seen = torch.randn(3, 2, 4, 8), torch.arange(12).view(3, 4), torch.tensor([2, 1, 0])
    kv = {0: (torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16))}
    state = FlamingoState(media, index, seen, kv)
    moved = take_rows(state, rows)
    assert isinstance(moved, FlamingoState) and isinstance(moved.kv[0], tuple)
    for got, original in [(moved.media, media), (moved.media_index, index), (moved.seen, seen),
                          (moved.kv[0][0], kv[0][0]), (moved.kv[0][1], kv[0][1])]:
        assert torch.equal(got, original[rows])
    other = torch.randn(5, 3)  # not per row: left alone, as are None and plain values
    assert take_rows([other, None, 7], rows)[0] is other and take_rows(None, rows) is None


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_image_rows_outside_the_batch_are_refused_before_the_model_runs(fusion, monkeypatch):
    model = tiny_model(fusion)
    batch = batch_from(model, [[1, IMAGE_ID, 3]], [images(1)])
    batch.image_sample_index = torch.tensor([1])  # a second row that does not exist
    monkeypatch.setattr(model.vision, "forward", lambda *a: pytest.fail("the tower ran on a bad batch"))
    with pytest.raises(ValueError, match=r"image_sample_index \[1\] must give each of the 1 images a row of the batch's 1"):
        model(batch)
