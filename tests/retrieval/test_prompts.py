"""Few-shot prompts: the interleaved layout, images per fusion, LLaVA rows with several images,
Flamingo's media mask, and the length checks."""

import dataclasses

import pytest
import torch
from PIL import Image
from tiny_models import open_gates, tiny_model, tiny_model_for

from vlm.data.formats import encode_sample
from vlm.errors import UserError
from vlm.model import build_model
from vlm.retrieval import Demonstration, Entry, Index, fewshot_prompt, first_line, retrieved_demonstrations
from vlm.text.chat import IGNORE_INDEX, ChatTemplate

CAPTIONS = ["a red circle.", "a small blue square.", "a green triangle left of a red circle."]


def picture(shade: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (shade, 255 - shade, (7 * shade) % 256))


def demos(k: int) -> list[Demonstration]:
    return [Demonstration(CAPTIONS[i % 3], picture(40 * i + 10), key=f"d{i}") for i in range(k)]


@pytest.mark.parametrize("k", [0, 1, 3])
def test_the_prompt_is_the_interleaved_training_layout(tokenizer, k):
    query = picture(200)
    sample = fewshot_prompt(tokenizer, demos(k), query, target="a purple square.")
    # the same document as an interleaved training sample holds (its last caption is the target)
    segments = [part for i, d in enumerate(demos(k)) for part in
                ({"type": "image", "index": i}, {"type": "text", "text": d.caption + "\n"})]
    segments += [{"type": "image", "index": k}, {"type": "text", "text": "a purple square.\n"}]
    images = {f"{i}.png": d.image for i, d in enumerate(demos(k))} | {f"{k}.png": query}
    reference = encode_sample({"__key__": "doc", "json": {"segments": segments}, **images}, ChatTemplate(tokenizer))
    assert sample.input_ids == reference.input_ids[:-1]  # all but its <|end_of_text|>
    assert [image.tobytes() for image in sample.images] == [d.image.tobytes() for d in demos(k)] + [query.tobytes()]
    assert sample.input_ids.count(tokenizer.image_id) == k + 1
    target = tokenizer.encode("a purple square.\n")
    assert sample.labels == [IGNORE_INDEX] * (len(sample.input_ids) - len(target)) + target  # only the target scores
    prompt = fewshot_prompt(tokenizer, demos(k), query)
    assert prompt.input_ids == sample.input_ids[: len(prompt.input_ids)] and set(prompt.labels) == {IGNORE_INDEX}


def test_captions_only_demonstrations_have_no_image(tokenizer):
    sample = fewshot_prompt(tokenizer, [Demonstration("a red circle."), Demonstration("a blue square.")], picture(1))
    assert len(sample.images) == 1 and sample.input_ids.count(tokenizer.image_id) == 1
    assert sample.input_ids[-1] == tokenizer.image_id
    assert first_line(" a red circle.\n<more> ") == "a red circle." and first_line("no newline ") == "no newline"


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_image_tokens_per_fusion(tokenizer, fusion):
    model = tiny_model_for(tokenizer, fusion)
    sample = fewshot_prompt(tokenizer, demos(2), picture(200), model=model)
    assert all(isinstance(image, torch.Tensor) and image.shape == (3, 16, 16) for image in sample.images)
    batch = model._prompt_batch([sample.images], [sample.input_ids], tokenizer.pad_id)
    per_image = {"llava": model.vision.num_tokens, "flamingo": 1}[fusion]
    assert int((batch.input_ids == tokenizer.image_id).sum()) == 3 * per_image
    assert batch.input_ids.shape[1] == len(sample.input_ids) + 3 * (per_image - 1)


def test_llava_fills_each_image_span_with_its_own_image_in_order(tokenizer):
    model = tiny_model_for(tokenizer, "llava")
    sample = fewshot_prompt(tokenizer, demos(2), picture(200), model=model)
    batch = model._prompt_batch([sample.images], [sample.input_ids], tokenizer.pad_id)
    with torch.no_grad():
        state = model.fusion.prepare(model.vision(batch.pixel_values), batch)
        h = model.fusion.embed(model.text.tok_embeddings(batch.input_ids), state)[0]  # [T, D]
        spans = h[batch.input_ids[0] == tokenizer.image_id].unflatten(0, (3, -1))  # [images, tokens, D]
        for image, span in zip(sample.images, spans):
            torch.testing.assert_close(span, model.fusion.projector(model.vision(image[None]))[0])


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_rows_with_several_images_equal_the_rows_one_by_one(tokenizer, fusion):
    """Prompts of 0, 1 and 3 demonstrations (1, 2 and 4 images, left-padded to one batch) decode as alone."""
    model = tiny_model_for(tokenizer, fusion)
    if fusion == "flamingo":
        open_gates(model)
    samples = [fewshot_prompt(tokenizer, demos(k), picture(90 + k), model=model) for k in (3, 0, 1)]
    options = dict(max_new_tokens=6, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    together = model.generate([s.images for s in samples], [s.input_ids for s in samples], **options)
    alone = [model.generate([s.images], [s.input_ids], **options)[0] for s in samples]
    assert together == alone and all(len(tokens) == 6 for tokens in together)
    with torch.no_grad():
        batch = model._prompt_batch([s.images for s in samples], [s.input_ids for s in samples], tokenizer.pad_id)
        last = model(batch).logits[:, -1]
        for row, sample in enumerate(samples):
            single = model._prompt_batch([sample.images], [sample.input_ids], tokenizer.pad_id)
            torch.testing.assert_close(last[row], model(single).logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("immediate", [True, False])
def test_flamingo_caption_tokens_attend_to_their_own_image(tokenizer, immediate):
    """At the first cross-attention block (before any self-attention mixes positions), changing image 2
    of 3 changes exactly the tokens after it: only its own caption's with only_attend_immediate, also the
    later ones without."""
    config = tiny_model("flamingo", only_attend_immediate=immediate).config
    model = build_model(dataclasses.replace(config, text=dataclasses.replace(config.text,
                                                                             vocab_size=tokenizer.vocab_size))).eval()
    open_gates(model)
    sample = fewshot_prompt(tokenizer, demos(2), picture(200), model=model, target="a purple square.")
    batch = model._prompt_batch([sample.images], [sample.input_ids], tokenizer.pad_id)
    changed = batch.pixel_values.clone()
    changed[1] = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.text.tok_embeddings(batch.input_ids)
        outputs = []
        for pixels in (batch.pixel_values, changed):
            state = model.fusion.prepare(model.vision(pixels), batch)
            outputs.append(model.fusion.before_layer(0, h, state)[0])
    media = state.media_index[0]  # [T]: 1-based index of the latest image at or before each token
    differs = (outputs[0] - outputs[1]).abs().amax(-1) > 1e-6  # [T]
    assert differs[media == 2].all() and not differs[media < 2].any()
    assert bool(differs[media == 3].any()) == (not immediate)


def test_too_long_a_prompt_names_the_lengths(tokenizer):
    model = tiny_model_for(tokenizer, "llava")
    per_image = model.tokens_per_image
    length = len(fewshot_prompt(tokenizer, demos(3), picture(1)).input_ids) + 4 * (per_image - 1)
    model.config.text = dataclasses.replace(model.config.text, max_seq_len=length + 5)
    fewshot_prompt(tokenizer, demos(3), picture(1), model=model, max_new_tokens=5)  # fits exactly
    with pytest.raises(UserError, match=rf"3 demonstration\(s\) is too long: 4 image\(s\) x {per_image} token\(s\) "
                                        rf"\+ \d+ text tokens = {length}, \+ max_new_tokens 6 = {length + 6} > "
                                        rf"max_seq_len {length + 5}"):
        fewshot_prompt(tokenizer, demos(3), picture(1), model=model, max_new_tokens=6)


def test_flamingo_refuses_more_images_than_its_max_images(tokenizer):
    model = tiny_model_for(tokenizer, "flamingo")
    fewshot_prompt(tokenizer, demos(7), picture(1), model=model)
    with pytest.raises(UserError, match=r"9 images but the model's fusion takes at most max_images=8.*at most 7 shots"):
        fewshot_prompt(tokenizer, demos(8), picture(1), model=model)


def test_retrieved_demonstrations_put_the_most_similar_last(tmp_path):
    """RICES order, images read back from the shards of the entries."""
    from vlm.data.shapes import make_shapes_dataset
    from vlm.eval.evaluate import caption_examples

    make_shapes_dataset(tmp_path, train=4, val=0, seed=0, workers=0, variants=["caption"], progress=False)
    shard = str(next((tmp_path / "caption").glob("train-*.tar")))
    examples = list(caption_examples([shard]))
    index = Index(torch.eye(4), [Entry(e.key, tuple(e.references), shard, e.member) for e in examples])
    hits = index.search(torch.tensor([[0.1, 0.0, 0.9, 0.5]]), 3)[0]
    assert [hit.row for hit in hits] == [2, 3, 0]
    chosen = retrieved_demonstrations(index, hits)
    assert [d.key for d in chosen] == [examples[i].key for i in (0, 3, 2)]
    assert [d.image.tobytes() for d in chosen] == [examples[i].image.tobytes() for i in (0, 3, 2)]
    assert [d.caption for d in chosen] == [examples[i].references[0] for i in (0, 3, 2)]
    assert all(d.image is None for d in retrieved_demonstrations(index, hits, images=False))
