"""Vision encoders: tiny timm and open_clip towers built offline, checked against the libraries."""

import json

import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import resolve_model_data_config
from torch import nn

from vlm.vision import (OpenClipEncoder, TimmEncoder, VisionConfig, VisionEncoder, build_vision_encoder,
                        list_encoders, register)
from vlm.errors import UserError
from vlm.vision import base

TIMM_MODEL = "vit_tiny_patch16_224"
TIMM_TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
CLIP_VISION = {"width": 64, "layers": 2, "patch_size": 8, "image_size": 32, "head_width": 32}
CLIP_TINY = {"embed_dim": 16, "vision_cfg": CLIP_VISION}
CLIP_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
PATCHES = (32 // 8) ** 2


def tiny(library: str, **overrides) -> VisionConfig:
    if library == "timm":
        kwargs = {**TIMM_TINY, **overrides.pop("extra_kwargs", {})}
        return VisionConfig(name="timm", model=TIMM_MODEL, model_kwargs=kwargs, **overrides)
    return VisionConfig(name="open_clip", model="ViT-B-32", model_kwargs=dict(CLIP_TINY), **overrides)


def library_module(encoder: VisionEncoder) -> nn.Module:
    return encoder.model if isinstance(encoder, TimmEncoder) else encoder.visual


@pytest.mark.parametrize("library,dim", [("timm", 32), ("open_clip", 64)])
@pytest.mark.parametrize("keep", [False, True])
def test_features_have_declared_shape(library, dim, keep, pixels):
    encoder = build_vision_encoder(tiny(library, keep_prefix_tokens=keep))
    assert (encoder.num_tokens, encoder.dim, encoder.image_size) == (PATCHES + keep, dim, 32)
    assert encoder(pixels).shape == (2, encoder.num_tokens, encoder.dim)


def test_prefix_tokens_change_num_tokens_by_prefix_count(tmp_path, pixels):
    dropped = build_vision_encoder(tiny("timm", extra_kwargs={"reg_tokens": 4}))
    torch.save(dropped.model.state_dict(), tmp_path / "w.pt")
    kept = build_vision_encoder(tiny("timm", extra_kwargs={"reg_tokens": 4}, keep_prefix_tokens=True,
                                     checkpoint_path=str(tmp_path / "w.pt")))
    prefix = dropped.model.num_prefix_tokens
    assert prefix == 5 and kept.num_tokens - dropped.num_tokens == prefix
    assert torch.equal(kept(pixels)[:, prefix:], dropped(pixels))


def test_cnn_tokens_are_flattened_stage_maps(pixels):
    last = build_vision_encoder(VisionConfig(model="resnet10t", image_size=32, feature_layer=-1))
    stage3 = build_vision_encoder(VisionConfig(model="resnet10t", image_size=32, feature_layer=-2))
    assert (last.num_tokens, last.dim, stage3.num_tokens, stage3.dim) == (1, 512, 4, 256)
    assert stage3(pixels).shape == (2, 4, 256)


def _capture_output(block: nn.Module, run) -> torch.Tensor:
    captured = []
    handle = block.register_forward_hook(lambda _m, _i, out: captured.append(out))
    run()
    handle.remove()
    return captured[0]


def test_timm_layers_match_library(tmp_path, pixels):
    reference = timm.create_model(TIMM_MODEL, **TIMM_TINY).eval()  # full model, head included
    save_file(reference.state_dict(), str(tmp_path / "full.safetensors"))
    outputs = {}
    for layer in (-1, -2):
        encoder = build_vision_encoder(tiny("timm", feature_layer=layer, keep_prefix_tokens=True,
                                            checkpoint_path=str(tmp_path / "full.safetensors")))
        outputs[layer] = encoder(pixels)
        [(patches, prefix)] = reference.forward_intermediates(
            pixels, indices=[layer], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        assert torch.equal(outputs[layer], torch.cat([prefix, patches], dim=1))
    last_block = _capture_output(reference.blocks[-1], lambda: reference.forward_features(pixels))
    assert torch.equal(outputs[-1], last_block)
    assert not torch.allclose(outputs[-1], outputs[-2])


def test_open_clip_layers_match_library(tmp_path, pixels):
    clip = open_clip.create_model("ViT-B-32", **CLIP_TINY, text_cfg=CLIP_TEXT).eval()
    # a training checkpoint: wrapped, saved from DDP, text tower included
    full = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}
    torch.save(full, tmp_path / "epoch_3.pt")
    outputs = {}
    for layer in (-1, -2):
        encoder = build_vision_encoder(tiny("open_clip", feature_layer=layer, keep_prefix_tokens=True,
                                            checkpoint_path=str(tmp_path / "epoch_3.pt")))
        outputs[layer] = encoder(pixels)
        with torch.no_grad():  # like the frozen encoder: MultiheadAttention's fast path differs in the last bits
            out = clip.visual.forward_intermediates(
                pixels, indices=[layer], output_fmt="NLC", intermediates_only=True, output_extra_tokens=True)
        expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        assert torch.equal(outputs[layer], expected)
    with torch.no_grad():
        last_block = _capture_output(clip.visual.transformer.resblocks[-1], lambda: clip.encode_image(pixels))
    assert torch.equal(outputs[-1], last_block)
    assert not torch.allclose(outputs[-1], outputs[-2])


@pytest.mark.parametrize("library,filename", [("timm", "w.pt"), ("open_clip", "visual.safetensors")])
def test_checkpoint_round_trip(library, filename, tmp_path, pixels):
    encoder = build_vision_encoder(tiny(library))
    state = library_module(encoder).state_dict()
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = build_vision_encoder(tiny(library, checkpoint_path=str(path)))
    assert torch.equal(loaded(pixels), encoder(pixels))
    assert not torch.equal(build_vision_encoder(tiny(library))(pixels), encoder(pixels))


@pytest.mark.parametrize("library,prefix,weight", [
    ("timm", "", "blocks.0.attn.qkv.weight"),
    ("open_clip", "visual.", "transformer.resblocks.0.attn.in_proj_weight"),
])
def test_wrong_checkpoint_names_the_tensors(library, prefix, weight, tmp_path):
    state = {prefix + k: v for k, v in library_module(build_vision_encoder(tiny(library))).state_dict().items()}
    good_shape = tuple(state[prefix + weight].shape)
    state[prefix + weight] = torch.zeros(7, 3)
    missing = sorted(state)[0]
    del state[missing]
    state[prefix + "stray.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        build_vision_encoder(tiny(library, checkpoint_path=str(tmp_path / "bad.pt")))
    message = str(err.value)
    assert "bad.pt" in message and missing[len(prefix):] in message and "stray.weight" in message
    assert f"{weight}: checkpoint (7, 3) vs model {good_shape}" in message


def test_missing_checkpoint_file_is_an_error(tmp_path):
    with pytest.raises(UserError) as caught:
        build_vision_encoder(tiny("timm", checkpoint_path=str(tmp_path / "nowhere.pt")))
    assert str(tmp_path / "nowhere.pt") in str(caught.value)
    assert "model.config.vision.checkpoint_path" in str(caught.value)


@pytest.mark.parametrize("config,names", [
    (VisionConfig(model="vit_tiny_patch16_244"), ["'vit_tiny_patch16_244'", "vit_tiny_patch16_224", "timm.list_models("]),
    (VisionConfig(name="open_clip", model="vit-b-23"), ["'vit-b-23'", "ViT-B-32", "open_clip.list_models()"]),
    (VisionConfig(model="qqqqqqqqqqqq"), ["'qqqqqqqqqqqq'", "no close match"]),
])
def test_unknown_model_names_suggest_close_matches(config, names):
    with pytest.raises(UserError) as caught:
        build_vision_encoder(config)
    message = str(caught.value)
    assert "model.config.vision.model" in message and all(name in message for name in names), message


@pytest.mark.parametrize("library,resize_mode,words", [
    ("timm", None, "resized so its short side is 32 (bicubic), then centre-cropped to 32x32"),
    ("open_clip", "shortest", "resized so its short side is 32 (bicubic), then centre-cropped to 32x32"),
    ("open_clip", "longest", "resized so its long side is 32 (bicubic), then centre-cropped or padded to 32x32"),
    ("open_clip", "squash", "stretched to 32x32 (bicubic), not keeping its aspect ratio"),
])
def test_transform_says_how_it_resizes(library, resize_mode, words):
    config = tiny(library)
    if resize_mode is not None:
        config.model_kwargs["preprocess_cfg"] = {"resize_mode": resize_mode}
    transform = build_vision_encoder(config).transform
    assert transform.resize == words
    # and it does what it says: a 64x32 image keeps its middle 32x32 (shortest), is squeezed (squash) or padded
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 16, 32))  # a black band on the left quarter
    left = transform(image)[:, 16, 0]
    assert (left > 0).all() == (resize_mode in (None, "shortest"))  # cropped away, so the left edge is white


@pytest.mark.parametrize("library,extra,mean", [
    ("timm", {}, None),
    ("open_clip", {}, open_clip.OPENAI_DATASET_MEAN),
    ("open_clip", {"preprocess_cfg": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}, (0.5, 0.5, 0.5)),
])
def test_transform_resizes_and_normalises(library, extra, mean):
    config = tiny(library)
    config.model_kwargs.update(extra)
    encoder = build_vision_encoder(config)
    if library == "timm":
        data_config = resolve_model_data_config(encoder.model)
        mean, std = data_config["mean"], data_config["std"]
    else:
        std = (0.5,) * 3 if extra else open_clip.OPENAI_DATASET_STD
    colour = (200, 100, 50)
    image = encoder.transform(Image.new("RGB", (48, 40), colour))
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    for channel in range(3):
        expected = (colour[channel] / 255 - mean[channel]) / std[channel]
        torch.testing.assert_close(image[channel], torch.full((32, 32), expected), atol=1e-5, rtol=0)
    assert encoder.transform(Image.new("L", (20, 30), 9)).shape == (3, 32, 32)


class _Head(nn.Module):
    def __init__(self, encoder: VisionEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels)).sum()


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_frozen_tower_gets_no_grad_and_stays_in_eval(library, pixels):
    model = _Head(build_vision_encoder(tiny(library)))
    model.train()
    assert not any(m.training for m in model.encoder.modules()) and model.head.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model(pixels).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.weight.grad is not None


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_unfrozen_tower_trains_every_parameter(library, pixels):
    model = _Head(build_vision_encoder(tiny(library, frozen=False)))
    model.train()
    assert model.encoder.training
    model(pixels).backward()
    # pruning left no parameter after the feature layer, so every one receives a gradient
    assert all(p.grad is not None for p in model.encoder.parameters())
    model.encoder.set_frozen(True)
    model.train()
    assert not model.encoder.training and not any(p.requires_grad for p in model.encoder.parameters())


def test_unfreezing_keeps_library_fixed_parameters_fixed():
    config = tiny("open_clip", frozen=False)
    config.model_kwargs["vision_cfg"] = {**CLIP_VISION, "pos_embed_type": "sin_cos_2d"}
    encoder = build_vision_encoder(config)
    assert not encoder.visual.positional_embedding.requires_grad
    assert encoder.visual.conv1.weight.requires_grad


@pytest.mark.parametrize("document", ["model_configs", "open_clip_config"])
def test_open_clip_reads_json_config(document, tmp_path):
    model_cfg = {"embed_dim": 16, "vision_cfg": {**CLIP_VISION, "patch_size": 16}, "text_cfg": CLIP_TEXT}
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    data = model_cfg if document == "model_configs" else {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    encoder = build_vision_encoder(VisionConfig(name="open_clip", model=str(path)))
    assert (encoder.num_tokens, encoder.dim) == (4, 64)
    expected_mean = (0.5,) * 3 if document == "open_clip_config" else open_clip.OPENAI_DATASET_MEAN
    assert encoder.transform.mean == pytest.approx(expected_mean)


def test_registry_lists_builtins_and_builds_a_user_encoder(monkeypatch, tmp_path, pixels):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    assert {"timm", "open_clip"} <= set(list_encoders())
    assert base._REGISTRY["timm"] is TimmEncoder and base._REGISTRY["open_clip"] is OpenClipEncoder

    @register("patchify")
    class Patchify(VisionEncoder):
        def __init__(self, *, image_size: int, dim: int) -> None:
            super().__init__()
            self.image_size = image_size
            self.proj = nn.Conv2d(3, dim, kernel_size=8, stride=8)
            self.transform = lambda image: torch.zeros(3, image_size, image_size)
            self.num_tokens, self.dim = self.probe_output_shape()

        @classmethod
        def from_config(cls, config: VisionConfig) -> "Patchify":
            return cls(image_size=config.image_size, dim=config.model_kwargs["dim"])

        def encode(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.proj(pixels).flatten(2).transpose(1, 2)

    config = VisionConfig(name="patchify", model="mine", image_size=32, model_kwargs={"dim": 6})
    encoder = build_vision_encoder(config)
    assert "patchify" in list_encoders() and (encoder.num_tokens, encoder.dim) == (16, 6)
    torch.save(encoder.state_dict(), tmp_path / "mine.pt")
    loaded = build_vision_encoder(VisionConfig(**{**config.to_dict(), "checkpoint_path": str(tmp_path / "mine.pt")}))
    assert torch.equal(loaded(pixels), encoder(pixels))
    with pytest.raises(ValueError, match="already registered"):
        register("timm")(Patchify)
    with pytest.raises(TypeError, match="VisionEncoder subclass"):
        register("plain")(nn.Linear)
    with pytest.raises(ValueError, match="unknown vision encoder 'nope'"):
        build_vision_encoder(VisionConfig(name="nope", model="x"))


@pytest.mark.parametrize("bad", [
    {"name": ""}, {"model": ""}, {"model": 3}, {"pretrained": "yes"}, {"feature_layer": 1.5},
    {"feature_layer": True}, {"image_size": 0}, {"image_size": -3}, {"checkpoint_path": ""},
    {"frozen": None}, {"model_kwargs": [1]}, {"model_kwargs": {1: 2}},
    {"pretrained": True, "checkpoint_path": "w.pt"},
])
def test_bad_config_values_raise(bad):
    with pytest.raises(ValueError, match="VisionConfig"):
        VisionConfig(**{"model": TIMM_MODEL, **bad})


def test_config_from_dict_checks_keys():
    config = tiny("timm", feature_layer=-1)
    assert VisionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys \\['layer'\\]"):
        VisionConfig.from_dict({"model": TIMM_MODEL, "layer": -2})
    with pytest.raises(ValueError, match="missing required key 'model'"):
        VisionConfig.from_dict({"name": "timm"})


@pytest.mark.parametrize("config,match", [
    (tiny("timm", feature_layer=2), "feature_layer=2"),
    (tiny("open_clip", feature_layer=-3), "feature_layer=-3"),
    (tiny("open_clip", pretrained=True), "checkpoint_path"),
    (VisionConfig(name="open_clip", model="ViT-B-32", model_kwargs={"text_cfg": {}}), "text_cfg"),
    (VisionConfig(name="open_clip", model="hf-hub:org/repo"), "no hub access"),
    (tiny("open_clip", image_size=64), "set only one"),
    (VisionConfig(model=TIMM_MODEL, model_kwargs={"not_an_arg": 1}), "rejected model_kwargs"),
    (VisionConfig(model=TIMM_MODEL, image_size=64, model_kwargs={"img_size": 32}), "set only one"),
])
def test_bad_builds_raise(config, match):
    with pytest.raises(ValueError, match=match):
        build_vision_encoder(config)


def test_wrong_pixel_shape_is_an_error():
    encoder = build_vision_encoder(tiny("timm"))
    with pytest.raises(ValueError, match=r"expects pixels \[B, 3, 32, 32\], got \[2, 3, 64, 64\]"):
        encoder(torch.zeros(2, 3, 64, 64))
