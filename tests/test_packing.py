"""Packed batches through the whole model, both fusions: caption, chat and interleaved samples packed
into rows give each sample the loss and gradients it gets run alone (1e-5, fp32), and no sample's
tokens or images reach another sample of its row. Reference: each sample collated alone."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import open_gates, tiny_model_for

from vlm.data.collate import Collator
from vlm.data.formats import encode_sample
from vlm.data.packing import Packer
from vlm.text.chat import ChatTemplate

CAPACITY = 96
FUSIONS = ["llava", "flamingo", "flamingo-all"]  # flamingo-all: only_attend_immediate false


def picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy())


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32).view(16, 16, 3).permute(2, 0, 1) / 127.5 - 1


def raw_samples() -> list[dict]:
    """Two of each kind: captions (one image), chats (one image, or none), interleaved (two images)."""
    def chat(key, image, question, answer):
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        return {"__key__": key, "json": {"messages": messages}, **({"0.png": image} if image is not None else {})}

    def interleaved(key, texts, images):
        segments = [{"type": "text", "text": texts[0]}, {"type": "image", "index": 0}, {"type": "text", "text": texts[1]},
                    {"type": "image", "index": 1}, {"type": "text", "text": texts[2]}]
        return {"__key__": key, "json": {"segments": segments}, "0.png": images[0], "1.png": images[1]}

    p = [picture(i) for i in range(8)]
    return [
        {"__key__": "cap0", "png": p[0], "txt": "a red circle on a white background"},
        chat("chat0", p[1], "what is it?", "a small blue square"),
        interleaved("int0", ["a red circle", "then", "a green triangle next to it"], p[2:4]),
        {"__key__": "cap1", "png": p[4], "txt": "a small blue square next to a green triangle"},
        chat("chat1", None, "what colour is the sky?", "blue"),
        interleaved("int1", ["one", "two", "a white background"], p[5:7]),
    ]


def encoded(tokenizer, *, other_images: str | None = None) -> list:
    """The samples encoded; those of key `other_images` with other pictures."""
    template, samples = ChatTemplate(tokenizer), raw_samples()
    for sample in samples:
        if sample["__key__"] == other_images:
            sample.update({name: picture(100 + i) for i, name in enumerate(sorted(sample)) if name.endswith("png")})
    return [encode_sample(sample, template, transform=to_tensor) for sample in samples]


def model_and_collator(tokenizer, fusion: str):
    model = tiny_model_for(tokenizer, fusion.split("-")[0], seed=1)
    if fusion.startswith("flamingo"):
        open_gates(model, 0.5)  # so that images change the text
        model.fusion.options.only_attend_immediate = fusion == "flamingo"
    collator = Collator(pad_id=tokenizer.pad_id, image_id=tokenizer.image_id, image_token_count=model.tokens_per_image,
                        max_length=CAPACITY)
    return model, collator


def packed_batch(model, collator, samples):
    rows = list(Packer(CAPACITY, image_token_count=model.tokens_per_image, open_rows=2)(samples))
    assert len(rows) < len(samples), "some row holds several samples"
    return collator(rows)


def per_sample_losses(model, batch) -> dict[str, torch.Tensor]:
    """{sample key: mean next-token loss of that sample} from a packed batch's logits."""
    logits = model(batch).logits[:, :-1]
    labels, owners = batch.labels[:, 1:], batch.sample_ids[:, 1:]  # the label of position t is at t + 1
    token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    losses = {}
    for row, row_keys in enumerate(batch.keys):
        for number, key in enumerate(row_keys.split("+"), 1):
            mine = (owners[row] == number) & (labels[row] != -100)
            losses[key] = token_loss[row][mine].mean()
    return losses


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("fusion", FUSIONS)
def test_packed_losses_and_gradients_equal_samples_one_by_one(tokenizer, fusion):
    model, collator = model_and_collator(tokenizer, fusion)
    model.vision.set_frozen(False)  # the tower's gradients too
    samples = encoded(tokenizer)
    packed = per_sample_losses(model, packed_batch(model, collator, samples))
    sum(packed.values()).backward()
    packed_grads = gradients(model)
    alone = {sample.key: model(collator([sample]), return_logits=False).loss for sample in samples}
    sum(alone.values()).backward()
    alone_grads = gradients(model)
    assert sorted(packed) == sorted(alone)
    for key in alone:
        torch.testing.assert_close(packed[key], alone[key], atol=1e-5, rtol=0, msg=key)
    assert sorted(packed_grads) == sorted(alone_grads)
    assert {name.split(".")[0] for name in alone_grads} == {"text", "vision", "fusion"}
    for name in alone_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("target", ["int0", "chat0"])
@torch.no_grad()
def test_perturbing_one_sample_leaves_the_others_unchanged(tokenizer, fusion, target):
    model, collator = model_and_collator(tokenizer, fusion)
    batch = packed_batch(model, collator, encoded(tokenizer))
    changed = packed_batch(model, collator, encoded(tokenizer, other_images=target))  # same layout
    row = next(r for r, keys in enumerate(batch.keys) if target in keys.split("+"))
    assert "+" in batch.keys[row], f"{target} shares its row"
    mine = torch.zeros_like(batch.sample_ids, dtype=torch.bool)
    mine[row] = batch.sample_ids[row] == batch.keys[row].split("+").index(target) + 1
    text = mine & (batch.input_ids != tokenizer.image_id)
    changed.input_ids = torch.where(text & (torch.arange(text.shape[1]) % 2 == 0), 40, batch.input_ids)
    assert not torch.equal(changed.pixel_values, batch.pixel_values) and not torch.equal(changed.input_ids, batch.input_ids)
    differs = (model(batch).logits - model(changed).logits).abs().amax(-1)  # [B, T]
    assert differs[mine].max() > 1e-3, "the perturbed sample changes"
    assert differs[~mine].max() == 0, "no other sample of the batch does"
