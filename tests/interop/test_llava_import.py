"""A tiny random llava-hf checkpoint written by transformers loads into vlm (vlm.load_model,
model.init_checkpoint) with the same logits (1e-5, fp32) and greedy tokens, and exports back to the
same tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tiny_llava_hf import save_tiny_llava  # noqa: E402
from vlm import load_model  # noqa: E402
from vlm.checkpoints.llava_hf import is_llava_hf, llava_config, save_llava_hf  # noqa: E402
from vlm.errors import UserError  # noqa: E402
from vlm.export import load_tokenizer  # noqa: E402
from vlm.model import ModelInput, build_model  # noqa: E402

VARIANTS = [("clip", "default", -2, False), ("clip", "full", -1, True), ("siglip", "full", 2, False)]


def expand(row: list[int], image_id: int, per_image: int) -> list[int]:
    return [t for token in row for t in [token] * (per_image if token == image_id else 1)]


def prompts(tokenizer, tokens_per_image: int) -> tuple[list[list[int]], torch.Tensor]:
    """Two rows of different lengths (one with two images), expanded as llava-hf's processor does."""
    text = tokenizer.encode
    image = [tokenizer.image_id]
    rows = [[tokenizer.bos_id, *image, *text("What color is the circle?")],
            [tokenizer.bos_id, *text("A photo"), *image, *text(" and"), *image, *text(" two shapes.")]]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return [expand(row, tokenizer.image_id, tokens_per_image) for row in rows], pixels


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


@pytest.mark.parametrize("family,strategy,layer,tie", VARIANTS)
def test_llava_hf_logits_and_greedy_tokens_equal(tmp_path, tokenizer, family, strategy, layer, tie):
    theirs = save_tiny_llava(tmp_path / "hf", tokenizer, family=family, strategy=strategy, layer=layer, tie=tie)
    ours = load_model(tmp_path / "hf")
    assert is_llava_hf(tmp_path / "hf") and ours.config.vision.name == "hf_vit"
    rows, pixels = prompts(tokenizer, ours.tokens_per_image)
    ids, mask = right_padded(rows, tokenizer.pad_id)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(ModelInput(ids, mask, pixels, torch.tensor([0, 1, 1]))).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    # greedy decoding, one prompt at a time in transformers; the image token is never sampled in vlm
    short = [tokenizer.bos_id, tokenizer.image_id, *tokenizer.encode("What color")]
    expanded = expand(short, tokenizer.image_id, ours.tokens_per_image)
    new = ours.generate([[pixels[0]]], [short], max_new_tokens=10)[0]
    with torch.no_grad():
        out = theirs.generate(input_ids=torch.tensor([expanded]), attention_mask=torch.ones(1, len(expanded)).long(),
                              pixel_values=pixels[:1], max_new_tokens=10, do_sample=False,
                              suppress_tokens=[tokenizer.image_id], eos_token_id=None, pad_token_id=tokenizer.pad_id)
    assert len(new) == 10 and new == out[0, len(expanded):].tolist()

@pytest.mark.parametrize("family,tie", [("clip", False), ("siglip", True)])
def test_export_back_gives_the_original_tensors(tmp_path, tokenizer, family, tie):
    save_tiny_llava(tmp_path / "hf", tokenizer, family=family, strategy="full", tie=tie)
    model = load_model(tmp_path / "hf")
    save_llava_hf(model, tmp_path / "back", tokenizer=load_tokenizer(tmp_path / "hf"))
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    # transformers 5 writes the tower without its vision_model. prefix; the published layout has it
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in original.items()}
    assert renamed.keys() == exported.keys()
    assert all(torch.equal(renamed[k], exported[k]) for k in renamed)
    a = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    b = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_checkpoint_reads_a_llava_hf_directory(tmp_path, tokenizer):
    from vlm.training.module import initial_state

    save_tiny_llava(tmp_path / "hf", tokenizer)
    model = build_model(llava_config(tmp_path / "hf"))
    state = initial_state(str(tmp_path / "hf"), model.state_dict())
    model.load_state_dict(state, strict=True)
    reference = load_model(tmp_path / "hf").state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)


def test_published_layout_and_missing_defaults(tmp_path, tokenizer):
    """The layout on the Hub (language_model.model.*, vision_tower.vision_model.*) and a config.json
    holding only what differs from transformers' defaults, as llava-1.5's does."""
    theirs = save_tiny_llava(tmp_path / "hf", tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act"):
        config.pop(key)  # transformers' defaults: -2, "default", "gelu"
    for key in ("rms_norm_eps", "rope_parameters", "hidden_act", "max_position_embeddings"):
        config["text_config"].pop(key, None)
    config["text_config"]["rms_norm_eps"] = 1e-5
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path / "hf")
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in theirs.state_dict().items())
    rows, pixels = prompts(tokenizer, model.tokens_per_image)
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ModelInput(ids, None, pixels[:1], torch.tensor([0]))).logits,
                                   reloaded(input_ids=ids, pixel_values=pixels[:1]).logits, atol=1e-5, rtol=1e-5)


def test_unsupported_llava_configs_are_one_line_errors(tmp_path, tokenizer):
    save_tiny_llava(tmp_path / "hf", tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, message in (({"vision_feature_layer": [-2, -5]}, "several layers"),
                            ({"projector_hidden_act": "relu"}, "not vlm's mlp2x_gelu"),
                            ({"vision_config": {"model_type": "dinov2"}}, "'dinov2' is not supported")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            load_model(tmp_path / "hf")
