"""encode_sample: exact ids and labels for caption, chat and interleaved samples; clear errors."""

import pytest
import torch
from PIL import Image

from vlm.data.decode import SampleError
from vlm.data.formats import encode_sample, sample_kind
from vlm.text.tokenizer import END_HEADER, START_HEADER

X = -100


def red(size=10):
    return Image.new("RGB", (size, size), (255, 0, 0))


def header(tok, role):
    return [tok.special_id(START_HEADER), *tok.encode(role), tok.special_id(END_HEADER), *tok.encode("\n\n")]


def test_caption_is_user_image_then_assistant_caption(template, tokenizer):
    tok = tokenizer
    encoded = encode_sample({"__key__": "c1", "png": red(), "txt": "a red square"}, template)
    prompt = [tok.bos_id, *header(tok, "user"), tok.image_id, tok.eot_id, *header(tok, "assistant")]
    answer = [*tok.encode("a red square"), tok.eot_id]
    assert encoded.input_ids == prompt + answer
    assert encoded.labels == [X] * len(prompt) + answer
    assert encoded.key == "c1" and len(encoded.images) == 1 and isinstance(encoded.images[0], Image.Image)
    from_json = encode_sample({"__key__": "c2", "jpg": red(), "json": {"caption": "a red square"}}, template)
    assert from_json.input_ids == encoded.input_ids and from_json.labels == encoded.labels


def test_chat_uses_template_and_orders_images_by_index(template, tokenizer):
    tok = tokenizer
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
        {"role": "assistant", "content": "It is a circle."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
        {"role": "assistant", "content": "a square"},
    ]
    first, second = red(), Image.new("RGB", (10, 10), (0, 0, 255))
    sample = {"__key__": "chat1", "1.jpg": second, "0.png": first, "json": {"messages": messages}}
    encoded = encode_sample(sample, template)
    turn1 = [*header(tok, "user"), tok.image_id, *tok.encode("What shape is this?"), tok.eot_id]
    reply1 = [*tok.encode("It is a circle."), tok.eot_id]
    turn2 = [*header(tok, "user"), *tok.encode("And this?"), tok.image_id, tok.eot_id]
    reply2 = [*tok.encode("a square"), tok.eot_id]
    a_header = header(tok, "assistant")
    assert encoded.input_ids == [tok.bos_id, *turn1, *a_header, *reply1, *turn2, *a_header, *reply2]
    assert encoded.labels == [X, *[X] * len(turn1), *[X] * len(a_header), *reply1,
                              *[X] * len(turn2), *[X] * len(a_header), *reply2]
    assert encoded.images == [first, second]


def test_interleaved_learns_text_and_end_of_text(template, tokenizer):
    tok = tokenizer
    segments = [{"type": "text", "text": "Here is a picture of a cat."}, {"type": "image", "index": 1},
                {"type": "text", "text": " Then a dog"}, {"type": "image", "index": 0}]
    cat, dog = red(), Image.new("RGB", (10, 10), (0, 255, 0))
    encoded = encode_sample({"__key__": "doc", "0.png": dog, "1.png": cat, "json": {"segments": segments}}, template)
    text1, text2 = tok.encode("Here is a picture of a cat."), tok.encode(" Then a dog")
    assert encoded.input_ids == [tok.bos_id, *text1, tok.image_id, *text2, tok.image_id, tok.eos_id]
    assert encoded.labels == [X, *text1, X, *text2, X, tok.eos_id]
    assert encoded.images == [cat, dog]  # order of appearance, not member index


def test_transform_is_applied_in_order(template, helpers):
    sample = {"__key__": "k", "png": red(), "txt": "a red square"}
    encoded = encode_sample(sample, template, transform=helpers.to_tensor)
    assert isinstance(encoded.images[0], torch.Tensor)
    assert encoded.images[0].shape == (3, helpers.image_size, helpers.image_size)
    assert torch.allclose(encoded.images[0][0], torch.ones(helpers.image_size, helpers.image_size))


def test_sample_kind():
    assert sample_kind({"json": {"messages": []}}) == "chat"
    assert sample_kind({"json": {"segments": []}}) == "interleaved"
    assert sample_kind({"json": {"caption": "x"}}) == "caption"
    assert sample_kind({"txt": "x"}) == "caption"


@pytest.mark.parametrize(("sample", "reason", "message"), [
    ({"png": red()}, "missing caption", "no caption"),
    ({"png": red(), "txt": "   "}, "missing caption", "no caption"),
    ({"txt": "a red square"}, "missing image", "exactly one image"),
    ({"png": red(), "jpg": red(), "txt": "two"}, "image mismatch", "exactly one image"),
    ({"0.png": red(), "1.png": red(),
      "json": {"messages": [{"role": "user", "content": [{"type": "image"}]},
                            {"role": "assistant", "content": "x"}]}}, "image mismatch", "1 image part"),
    ({"0.png": red(), "2.png": red(),
      "json": {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                            {"role": "assistant", "content": "x"}]}}, "image mismatch", "numbered 0..n-1"),
    ({"json": {"messages": [{"role": "user", "content": "hi"}]}}, "bad sample", "no assistant"),
    ({"json": {"messages": [{"role": "robot", "content": "hi"}]}}, "bad sample", "unknown role"),
    ({"0.png": red(), "json": {"segments": [{"type": "image", "index": 3}]}}, "image mismatch", "refers to image 3"),
    ({"0.png": red(), "1.png": red(), "json": {"segments": [{"type": "image", "index": 0}]}},
     "image mismatch", r"\[1\] are not referenced"),
    ({"json": {"segments": [{"type": "video"}]}}, "bad sample", "segment 0"),
    ({"json": {"segments": []}}, "bad sample", "non-empty"),
])
def test_bad_samples_name_the_key_and_reason(template, sample, reason, message):
    with pytest.raises(SampleError, match=message) as caught:
        encode_sample({"__key__": "bad/key_7", "__url__": "shard-000.tar", **sample}, template)
    assert caught.value.reason == reason
    assert caught.value.key == "bad/key_7" and "'bad/key_7'" in str(caught.value)
    assert "shard-000.tar" in str(caught.value)
