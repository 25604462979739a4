"""Deep fusion: zero gates = text model; media masking; cached decoding."""

import pytest
import torch
from tiny_models import IMAGE_ID, batch_from, images, open_gates, tiny_model

from vlm.fusion import FusionConfig

# Three images in one interleaved row: text, img1, text, img2, text, img3, text.
ROW = [1, 7, 8, IMAGE_ID, 9, 10, 11, IMAGE_ID, 12, 13, IMAGE_ID, 14, 15, 16]
IMG = [i for i, t in enumerate(ROW) if t == IMAGE_ID]  # [3, 7, 10]


def test_zero_gates_give_exactly_the_text_model():
    model = tiny_model("flamingo")
    batch = batch_from(model, [ROW, ROW[:9]], [images(3), images(2, seed=1)])
    with torch.no_grad():
        fused = model(batch).logits
        text = model.text(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(fused, text)


def _first_block_output(model, imgs):
    batch = batch_from(model, [ROW], [imgs])
    h = torch.randn(1, len(ROW), 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = model.fusion.prepare(model.vision(batch.pixel_values), batch)
        return model.fusion.before_layer(0, h, state)


@pytest.mark.parametrize("immediate", [True, False])
def test_media_mask(immediate):
    model = tiny_model("flamingo", only_attend_immediate=immediate)
    open_gates(model)
    base = images(3)
    out = _first_block_output(model, base)
    changed = _first_block_output(model, [base[0] + 1.0, base[1], base[2]])  # perturb image 1
    same = (out - changed).abs().amax(-1)[0] == 0  # [T]
    assert same[: IMG[0]].all(), "text before the first image must not see any image"
    assert not same[IMG[0] : IMG[1]].any(), "image 1 and its text see image 1"
    if immediate:
        assert same[IMG[1] :].all(), "after image 2, only image 2 (then 3) is visible"
    else:
        assert not same[IMG[1] :].any(), "all earlier images stay visible"


def test_text_before_first_image_gets_zero_update_in_full_model():
    model = tiny_model("flamingo")
    open_gates(model)
    batch = batch_from(model, [ROW], [images(3)])
    with torch.no_grad():
        fused = model(batch).logits
        text = model.text(batch.input_ids)
    assert torch.equal(fused[0, : IMG[0]], text[0, : IMG[0]])
    assert not torch.allclose(fused[0, IMG[0] :], text[0, IMG[0] :])


def test_cross_attn_every_places_blocks_before_those_layers():
    model = tiny_model("flamingo", cross_attn_every=2)
    assert len(model.fusion.blocks) == 2  # before layers 0 and 2 of 4


def test_image_token_count_mismatch_names_sample():
    model = tiny_model("flamingo")
    batch = batch_from(model, [ROW, [1, 2, IMAGE_ID]], [images(3), images(1)])
    batch.image_sample_index = torch.tensor([0, 0, 1, 1])
    batch.pixel_values = torch.stack(images(4))
    with pytest.raises(ValueError, match="sample 0: 3 <|image|> tokens but 2 image"):
        model.fusion.check(batch)  # VisionLanguageModel calls it before prepare, outside compilation


def test_more_than_max_images_in_a_sample_is_refused_by_check():
    model = tiny_model("flamingo", max_images=2)
    batch = batch_from(model, [ROW, ROW[:5]], [images(3), images(1)])
    with pytest.raises(ValueError, match="a sample has more than max_images=2 images"):
        model.fusion.check(batch)
    model.fusion.check(batch_from(model, [ROW[:9], ROW[:5]], [images(2), images(1)]))  # two each: fine


@pytest.mark.parametrize("immediate", [True, False])
def test_cached_equals_uncached_and_batched_equals_single(immediate):
    model = tiny_model("flamingo", only_attend_immediate=immediate)
    open_gates(model, 0.5)
    prompts = [[1, IMAGE_ID, 9, 10, IMAGE_ID, 12], [2, IMAGE_ID, 3]]
    imgs = [images(2), images(1, seed=3)]
    single = [model.generate([i], [p], max_new_tokens=8)[0] for p, i in zip(prompts, imgs)]
    assert model.generate(imgs, prompts, max_new_tokens=8) == single
    assert model.generate(imgs, prompts, max_new_tokens=8, use_cache=False) == single
    # The images matter: different images, different continuation (gates are open).
    other = model.generate([images(2, seed=9), images(1, seed=8)], prompts, max_new_tokens=8)
    assert other != single


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown options"):
        FusionConfig("flamingo", {"cross_attn_evry": 2})
    with pytest.raises(ValueError, match="cross_attn_every"):
        FusionConfig("flamingo", {"cross_attn_every": 0})


def test_gate_init_opens_the_gates():
    model = tiny_model("flamingo", gate_init=1.0)
    assert all(float(b.attn_gate) == 1.0 and float(b.ff_gate) == 1.0 for b in model.fusion.blocks)
    assert all(float(b.attn_gate) == 0.0 for b in tiny_model("flamingo").fusion.blocks)
