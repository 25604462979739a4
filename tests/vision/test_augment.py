"""Train-time augmentation: VisionConfig.augment -> encoder.train_transform, for every encoder."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vlm.vision import AugmentConfig, VisionConfig, VisionEncoder, build_vision_encoder
from vlm.vision.augment import RandomAreaCrop

CLIP_VISION = {"width": 64, "layers": 2, "patch_size": 8, "image_size": 32, "head_width": 32}
CLIP_TINY = {"embed_dim": 16, "vision_cfg": CLIP_VISION}
RANDOM = {"scale": [0.3, 1.0], "ratio": [0.75, 1.33], "hflip": 0.5, "color_jitter": 0.4, "hue": 0.05}


def config(library: str, augment=None) -> VisionConfig:
    if library == "timm":
        return VisionConfig(model="resnet10t", image_size=32, augment=augment)
    return VisionConfig(name="open_clip", model="ViT-B-32", model_kwargs=CLIP_TINY, augment=augment)


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_train_transform_matches_eval_output(library):
    encoder = build_vision_encoder(config(library, augment=RANDOM))
    train, eval_ = encoder.train_transform, encoder.transform
    assert train.random and not eval_.random and train is not eval_
    assert (train.image_size, train.mean, train.std) == (eval_.image_size, eval_.mean, eval_.std)
    assert train.resize == eval_.resize  # the eval resize and crop steps follow the random ones
    assert train(photo()).shape == eval_(photo()).shape == (3, 32, 32)
    assert train(Image.new("L", (20, 50), 9)).shape == (3, 32, 32)  # grey, tall, smaller than S


@pytest.mark.parametrize("library", ["timm", "open_clip"])
@pytest.mark.parametrize("augment", [None, {}, {"scale": [1, 1], "hflip": 0}])
def test_no_augmentation_is_the_eval_transform(library, augment):
    encoder = build_vision_encoder(config(library, augment=augment))
    assert encoder.train_transform is encoder.transform and not encoder.transform.random


def test_draws_follow_the_torch_seed():
    transform = build_vision_encoder(config("timm", augment=RANDOM)).train_transform
    image = photo()

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return transform(image)

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    copied = pickle.loads(pickle.dumps(transform))  # as DataLoader workers receive it
    torch.manual_seed(0)
    assert torch.equal(copied(image), draw(0))


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_certain_flip_is_the_mirrored_eval_image(library):
    encoder = build_vision_encoder(config(library, augment={"hflip": 1.0, "scale": [1.0, 1.0]}))
    # even margins (96x64 -> 48x32, centre crop 8 px each side) so that the eval crop is symmetric
    for image in (photo(96, 64), photo(64, 64, seed=1)):
        assert torch.equal(encoder.train_transform(image), encoder.transform(image).flip(-1))


def window(image: Image.Image, crop: Image.Image) -> tuple[int, int] | None:
    """(left, top) where ``crop`` sits in ``image``, or None."""
    big, small = np.asarray(image), np.asarray(crop)
    h, w = small.shape[:2]
    for top, left in np.argwhere(np.all(big == small[0, 0], axis=-1)):
        if np.array_equal(big[top:top + h, left:left + w], small):
            return int(left), int(top)
    return None


def test_crop_keeps_the_area_fraction_and_the_image_aspect():
    image = photo(80, 40)
    torch.manual_seed(0)
    crops = [RandomAreaCrop((0.25, 0.25), (1.0, 1.0))(image) for _ in range(20)]
    assert {crop.size for crop in crops} == {(40, 20)}  # a quarter of the area, the image's own 2:1 aspect
    windows = {window(image, crop) for crop in crops}  # each crop is a window of the image ...
    assert None not in windows and len(windows) > 10  # ... and the windows move
    whole = RandomAreaCrop((1.0, 1.0), (1.0, 1.0))(image)
    assert whole.size == image.size and whole.tobytes() == image.tobytes()
    wide = RandomAreaCrop((0.5, 0.5), (2.0, 2.0))(image)  # twice the image's aspect, clamped to its width
    assert wide.size == (80, 20)


@pytest.mark.parametrize("bad,field", [
    ({"scale": [0.0, 1.0]}, "scale"), ({"scale": [0.8, 0.5]}, "scale"), ({"scale": [0.5, 1.5]}, "scale"),
    ({"scale": 0.5}, "scale"), ({"scale": [0.5, "1"]}, "scale"), ({"ratio": [0.0, 1.0]}, "ratio"),
    ({"ratio": [2.0, 1.0]}, "ratio"), ({"ratio": [1.0, float("inf")]}, "ratio"), ({"hflip": 1.5}, "hflip"),
    ({"hflip": True}, "hflip"), ({"color_jitter": -0.1}, "color_jitter"), ({"color_jitter": 2}, "color_jitter"),
    ({"hue": 0.6}, "hue"), ({"hue": "a bit"}, "hue"),
])
def test_bad_options_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"VisionConfig.augment.{field} must be"):
        config("timm", augment=bad)


def test_unknown_options_and_types_are_refused():
    with pytest.raises(ValueError, match=r"VisionConfig.augment: unknown keys \['flip'\]; allowed keys are "
                                         r"\['color_jitter', 'hflip', 'hue', 'ratio', 'scale'\]"):
        config("timm", augment={"flip": 0.5})
    with pytest.raises(ValueError, match="VisionConfig.augment must be a mapping"):
        config("timm", augment=0.5)


def test_augment_round_trips_through_dict_and_json():
    original = config("timm", augment={"scale": [0.5, 1], "hflip": 0.5})
    assert original.augment == AugmentConfig(scale=(0.5, 1.0), hflip=0.5)
    assert VisionConfig.from_dict(original.to_dict()) == original
    assert VisionConfig.from_dict(json.loads(json.dumps(original.to_dict()))) == original  # lists come back as tuples
    assert VisionConfig.from_dict(config("timm").to_dict()).augment is None


def test_encoders_built_directly_have_the_eval_transform_for_training():
    class Plain(VisionEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.image_size = 8
            self.proj = nn.Conv2d(3, 4, kernel_size=8)
            self.transform = lambda image: torch.zeros(3, 8, 8)
            self.num_tokens, self.dim = self.probe_output_shape()

        @classmethod
        def from_config(cls, config: VisionConfig) -> "Plain":
            return cls()

        def encode(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.proj(pixels).flatten(2).transpose(1, 2)

    encoder = Plain()
    assert encoder.train_transform is encoder.transform
    with pytest.raises(ValueError, match="Plain.transform must be an ImageTransform to be augmented"):
        encoder.set_augment(AugmentConfig(hflip=0.5))
