"""The hf_vit encoder against transformers' CLIPVisionModel / SiglipVisionModel (tiny random models
saved by transformers, loaded from their safetensors): same features at 1e-5, as LLaVA selects them."""

import json

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vlm.errors import UserError  # noqa: E402
from vlm.vision import VisionConfig, build_vision_encoder, list_encoders  # noqa: E402
from vlm.vision.hf_vit import DEFAULTS, PREPROCESS, from_hf_feature_layer, to_hf_feature_layer  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 8}


def save_hf(tmp_path, family: str, **overrides):
    """A random transformers vision model of `family` saved under tmp_path; returns (model, folder)."""
    torch.manual_seed(0)
    if family == "clip":
        config = transformers.CLIPVisionConfig(**TINY, **overrides)
        model = transformers.CLIPVisionModel(config)
    else:
        config = transformers.SiglipVisionConfig(**TINY, **overrides)
        model = transformers.SiglipVisionModel(config)
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong wiring shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / family)
    return model.eval(), tmp_path / family


def hf_features(model, pixels, *, layer: int, strategy: str) -> torch.Tensor:
    """What LlavaModel.get_image_features feeds its projector, for one feature layer."""
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:] if strategy == "default" else hidden


@pytest.mark.parametrize("family,layer,strategy", [
    ("clip", -2, "default"), ("clip", -1, "full"), ("clip", 1, "full"), ("clip", 2, "default"),
    ("siglip", -2, "full"), ("siglip", -1, "full"), ("siglip", 1, "full")])  # SigLIP has no class token to drop
def test_features_equal_transformers(tmp_path, family, layer, strategy):
    model, folder = save_hf(tmp_path, family)
    encoder = build_vision_encoder(VisionConfig(
        name="hf_vit", model=str(folder), checkpoint_path=str(folder / "model.safetensors"),
        feature_layer=from_hf_feature_layer(layer, source="test"), keep_prefix_tokens=strategy == "full"))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = hf_features(model, pixels, layer=layer, strategy=strategy)
    with torch.no_grad():
        got = encoder(pixels)
    assert got.shape == expected.shape == (2, encoder.num_tokens, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert to_hf_feature_layer(encoder.feature_layer) == layer


@pytest.mark.parametrize("family,act", [("clip", "gelu"), ("siglip", "gelu_new")])
def test_other_activations_and_inline_config(tmp_path, family, act):
    model, folder = save_hf(tmp_path, family, hidden_act=act, layer_norm_eps=1e-4)
    settings = {**TINY, "hidden_act": act, "layer_norm_eps": 1e-4}
    encoder = build_vision_encoder(VisionConfig(name="hf_vit", model=family, model_kwargs=settings, feature_layer=-1,
                                                keep_prefix_tokens=True,
                                                checkpoint_path=str(folder / "model.safetensors")))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), hf_features(model, pixels, layer=-1, strategy="full"),
                                   atol=1e-5, rtol=1e-5)


def test_unused_blocks_are_kept_frozen_and_round_trip(tmp_path):
    model, folder = save_hf(tmp_path, "siglip")
    encoder = build_vision_encoder(VisionConfig(name="hf_vit", model=str(folder), frozen=False, feature_layer=-2,
                                                checkpoint_path=str(folder / "model.safetensors")))
    theirs = {f"vision_model.{k}": v for k, v in model.state_dict().items()}
    ours = encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert "vision_model.encoder.layers.1.mlp.fc1.weight" in trainable
    assert not any(".layers.2." in n or "post_layernorm" in n or ".head." in n for n in trainable)


def test_defaults_are_those_of_transformers():
    for family, config, processor in (
            ("clip", transformers.CLIPVisionConfig(), transformers.CLIPImageProcessor()),
            ("siglip", transformers.SiglipVisionConfig(), transformers.SiglipImageProcessor())):
        theirs = config.to_dict()
        assert {k: theirs[k] for k in DEFAULTS[family]} == DEFAULTS[family]
        assert tuple(processor.image_mean) == PREPROCESS[family]["mean"]
        assert tuple(processor.image_std) == PREPROCESS[family]["std"]
        assert bool(getattr(processor, "do_center_crop", False)) == (PREPROCESS[family]["resize"] == "crop")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_transform_matches_the_image_processor(tmp_path, family):
    _, folder = save_hf(tmp_path, family)
    processor_class = transformers.CLIPImageProcessor if family == "clip" else transformers.SiglipImageProcessor
    size = {"shortest_edge": 32} if family == "clip" else {"height": 32, "width": 32}
    processor = processor_class(size=size, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    encoder = build_vision_encoder(VisionConfig(name="hf_vit", model=str(folder)))
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(encoder.transform(image), expected, atol=1e-5, rtol=0)


def test_bad_settings_are_one_line_errors(tmp_path):
    assert "hf_vit" in list_encoders()
    with pytest.raises(UserError, match="'clip' or 'siglip'"):
        build_vision_encoder(VisionConfig(name="hf_vit", model="vit-huge"))
    with pytest.raises(UserError, match="unknown keys \\['hiden_size'\\]"):
        build_vision_encoder(VisionConfig(name="hf_vit", model="clip", model_kwargs={**TINY, "hiden_size": 4}))
    with pytest.raises(UserError, match="feature_layer 3 does not exist"):
        build_vision_encoder(VisionConfig(name="hf_vit", model="clip", model_kwargs=TINY, feature_layer=3))
    with pytest.raises(UserError, match="hidden_act 'relu'"):
        build_vision_encoder(VisionConfig(name="hf_vit", model="clip", model_kwargs={**TINY, "hidden_act": "relu"}))
    with pytest.raises(UserError, match="not the embeddings or several layers"):
        from_hf_feature_layer([-2, -5], source="config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert'"):
        build_vision_encoder(VisionConfig(name="hf_vit", model=str(tmp_path)))
