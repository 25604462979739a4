"""Early fusion: splice, counts, and the text-only identity."""

import pytest
import torch
from tiny_models import IMAGE_ID, batch_from, images, tiny_model

from vlm.fusion import FusionConfig
from vlm.fusion.llava import build_projector


def test_no_images_gives_exactly_the_text_model():
    model = tiny_model("llava")
    batch = batch_from(model, [[1, 2, 3, 4], [7, 8]])
    with torch.no_grad():
        assert torch.equal(model(batch).logits, model.text(batch.input_ids, attention_mask=batch.attention_mask))


def test_splice_changes_only_logits_from_its_span_on():
    model = tiny_model("llava")
    row = [1, 2, IMAGE_ID, 3, 4, IMAGE_ID, 6, 7]
    base = images(2)
    a = batch_from(model, [row], [base])
    b = batch_from(model, [row], [[base[0], base[1] + 1.0]])  # change the second image only
    with torch.no_grad():
        la, lb = model(a).logits[0], model(b).logits[0]
    start = int((a.input_ids[0] == IMAGE_ID).nonzero()[model.tokens_per_image])  # first slot of image 2
    assert torch.equal(la[:start], lb[:start])
    assert not torch.allclose(la[start:], lb[start:])
    # and the image embeddings really sit at the slots
    with torch.no_grad():
        state = model.fusion.prepare(model.vision(a.pixel_values), a)
        h = model.fusion.embed(model.text.tok_embeddings(a.input_ids), state)
    slots = (a.input_ids[0] == IMAGE_ID).nonzero().flatten()
    torch.testing.assert_close(h[0, slots], state.image_embeds.flatten(0, 1), atol=0, rtol=0)


def test_images_out_of_row_order_are_spliced_into_their_rows():
    model = tiny_model("llava")
    imgs = images(2)
    ordered = batch_from(model, [[1, IMAGE_ID], [2, IMAGE_ID]], [[imgs[0]], [imgs[1]]])
    swapped = batch_from(model, [[1, IMAGE_ID], [2, IMAGE_ID]], [[imgs[0]], [imgs[1]]])
    swapped.pixel_values = swapped.pixel_values.flip(0)
    swapped.image_sample_index = torch.tensor([1, 0])
    with torch.no_grad():
        torch.testing.assert_close(model(ordered).logits, model(swapped).logits, atol=1e-6, rtol=1e-6)


def test_count_mismatch_states_both_counts_and_sample():
    model = tiny_model("llava")
    batch = batch_from(model, [[1, 2], [1, IMAGE_ID, 3]], [[], images(1)])
    batch.input_ids[1, -1] = IMAGE_ID  # one placeholder too many
    with pytest.raises(ValueError, match=rf"sample 1: {model.tokens_per_image + 1} image placeholder tokens but 1 image"):
        model(batch)


def test_projectors():
    assert len(build_projector("linear", 8, 16)) == 1
    mlp = build_projector("mlp3x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    with pytest.raises(ValueError, match="unknown projector"):
        FusionConfig("llava", {"projector": "mlp_relu"})


def test_cached_equals_uncached_and_batched_equals_single():
    model = tiny_model("llava")
    prompts = [[1, IMAGE_ID, 9, 10, IMAGE_ID, 12], [2, IMAGE_ID, 3], [4, 6, 7]]
    imgs = [images(2), images(1, seed=3), []]
    single = [model.generate([i], [p], max_new_tokens=8)[0] for p, i in zip(prompts, imgs)]
    assert model.generate(imgs, prompts, max_new_tokens=8) == single
    assert model.generate(imgs, prompts, max_new_tokens=8, use_cache=False) == single
    assert all(IMAGE_ID not in out for out in single)
