"""`vlm features build` and training with `data.features`: same losses as running the frozen tower,
and every case where a cache would be wrong is refused with its message."""

import json

import pytest
import torch
import yaml
from training_helpers import ROOT, fit_args, pretrain_tower, read_losses, tiny_recipe

from vlm.cli import main
from vlm.data.features import FeatureStore
from vlm.features import build_features, fingerprint
from vlm.training.features import recipe_tower


def frozen_recipe(tmp_path, shapes_dir, **extra):
    """The tiny recipe with its tower frozen and loaded from a checkpoint (a frozen tower is pretrained)."""
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=4, every=4, model__stage="instruct", **extra)
    spec = yaml.safe_load(recipe.read_text())
    spec["model"]["config"]["vision"] = {  # a CNN, so that another image_size still loads the same weights
        "name": "timm", "model": "resnet18", "image_size": 64, "feature_layer": -3,
        "model_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}}
    recipe.write_text(yaml.safe_dump(spec))
    pretrain_tower(recipe)
    return recipe


def recipe_configs(recipe, fusion="llava"):
    return [str(ROOT / "configs" / "shapes.yaml"), str(ROOT / "configs" / "fusion" / f"{fusion}.yaml"), str(recipe)]


def build_args(recipe, shapes_dir, out, *more, fusion="llava"):
    configs = [arg for path in recipe_configs(recipe, fusion) for arg in ("--config", path)]
    shards = shapes_dir / "caption"  # two --data patterns: the four training shards
    return ["features", "build", *configs, "--data", str(shards / "train-00000[01].tar"),
            "--data", str(shards / "train-00000[23].tar"), "--out", str(out), "--no-progress", *more]


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_training_from_cached_features_gives_the_same_losses(tmp_path, shapes_dir, fusion, capsys):
    recipe = frozen_recipe(tmp_path, shapes_dir)
    cache = tmp_path / "cache"
    assert main(build_args(recipe, shapes_dir, cache, fusion=fusion)) == 0
    assert "4 shard(s) built, 0 already done; 160 samples, 160 images cached" in capsys.readouterr().out
    assert main(fit_args(recipe, fusion)) == 0
    with_tower = read_losses(tmp_path / "run")
    assert main(fit_args(recipe, fusion, "--data.features", str(cache), "--overwrite")) == 0
    from_cache = read_losses(tmp_path / "run")
    assert sorted(with_tower) == sorted(from_cache) == [0, 1, 2, 3]
    for step in with_tower:  # tolerance 1e-6 (absolute, on losses near 5)
        assert abs(float(with_tower[step]) - float(from_cache[step])) <= 1e-6, (step, with_tower, from_cache)
    if fusion == "llava":  # the cache is what training read: doubled features change the losses
        from safetensors.torch import load_file, save_file

        for part in cache.glob("*.safetensors"):
            save_file({name: 2 * tensor for name, tensor in load_file(part).items()}, part)
        assert main(fit_args(recipe, fusion, "--data.features", str(cache), "--overwrite")) == 0
        assert abs(float(read_losses(tmp_path / "run")[0]) - float(with_tower[0])) > 1e-3


def test_cached_features_are_the_towers_outputs(tmp_path, shapes_dir):
    recipe = frozen_recipe(tmp_path, shapes_dir)
    model, precision = recipe_tower(recipe_configs(recipe))
    shards = sorted(str(p) for p in (shapes_dir / "caption").glob("train-*.tar"))
    build_features(model, shards[:1], tmp_path / "cache", precision=precision, batch_size=7, progress=False)
    store = FeatureStore(tmp_path / "cache", expected=fingerprint(model, precision))
    assert len(store) == 40 and store.fingerprint["dtype"] == "float32" and store.fingerprint["num_tokens"] == 64
    from vlm.data.decode import decode_sample, iter_shard_samples

    with open(shards[0], "rb") as stream:
        raw = next(iter_shard_samples(stream, shards[0], max_member_bytes=2**24))
    image = decode_sample(raw)["png"]
    with torch.no_grad():
        expected = model.vision(model.vision.transform(image)[None])[0]
    torch.testing.assert_close(store.get(raw["__key__"], "png"), expected, rtol=0, atol=1e-6)


def test_build_resumes_after_an_interrupted_shard_and_keeps_finished_ones(tmp_path, shapes_dir):
    recipe = frozen_recipe(tmp_path, shapes_dir)
    model, precision = recipe_tower(recipe_configs(recipe))
    shards = sorted(str(p) for p in (shapes_dir / "caption").glob("train-*.tar"))
    cache = tmp_path / "cache"
    first = build_features(model, shards, cache, precision=precision, progress=False)
    assert (first.shards_built, first.shards_kept, first.samples) == (4, 0, 160)
    records = sorted(cache.glob("*.shard.json"))
    before = {p.name: p.read_bytes() for p in cache.glob("*.safetensors")}
    records[1].unlink()  # as if the build had stopped while writing that shard
    second = build_features(model, shards, cache, precision=precision, progress=False)
    assert (second.shards_built, second.shards_kept, second.samples) == (1, 3, 40)
    assert {p.name: p.read_bytes() for p in cache.glob("*.safetensors")} == before
    assert not list(cache.glob(".*.tmp"))


def test_a_sample_missing_from_the_cache_is_skipped_and_counted(tmp_path, shapes_dir):
    from vlm.data.features import FeatureStore
    from vlm.data.decode import SampleError

    recipe = frozen_recipe(tmp_path, shapes_dir)
    model, precision = recipe_tower(recipe_configs(recipe))
    shards = sorted(str(p) for p in (shapes_dir / "caption").glob("train-*.tar"))
    build_features(model, shards[:1], tmp_path / "cache", precision=precision, progress=False)
    store = FeatureStore(tmp_path / "cache")
    with pytest.raises(SampleError, match="image png has no cached features in .*other shards") as error:
        store.substitute({"__key__": "not-there", "png": b"..."})
    assert error.value.reason == "no cached features"


def test_a_trainable_tower_is_refused(tmp_path, shapes_dir, capsys):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=2, every=2)  # stage full: the tower trains
    assert main(build_args(recipe, shapes_dir, tmp_path / "cache")) == 2
    assert "the vision tower trains (e.g. vision." in capsys.readouterr().err


def test_a_cache_of_another_tower_or_image_size_or_checkpoint_is_refused(tmp_path, shapes_dir, capsys):
    recipe = frozen_recipe(tmp_path, shapes_dir)
    cache = tmp_path / "cache"
    assert main(build_args(recipe, shapes_dir, cache)) == 0
    capsys.readouterr()
    # image size: training with a 32 px tower on a 64 px cache
    assert main(fit_args(recipe, "llava", "--data.features", str(cache), "--overwrite",
                         "--model.config.vision.image_size", "32")) == 2
    err = capsys.readouterr().err
    assert "was made by another tower, checkpoint, image size or precision" in err and "image_size: cache 64, model 32" in err
    # another tower's weights (another checkpoint): only the weights hash differs
    weights = tmp_path / "tower.pt"
    model, _ = recipe_tower(recipe_configs(recipe))
    torch.save({k: v + 0.01 for k, v in model.vision.model.state_dict().items()}, weights)
    assert main(fit_args(recipe, "llava", "--data.features", str(cache), "--overwrite",
                         "--model.config.vision.checkpoint_path", str(weights))) == 2
    err = capsys.readouterr().err
    assert "weights_sha256: cache" in err and "image_size" not in err
    # another precision
    assert main(build_args(recipe, shapes_dir, cache, "--trainer.precision", "bf16-mixed")) == 2
    assert "dtype: cache \"float32\", model \"bfloat16\"" in capsys.readouterr().err
    # not a cache at all
    assert main(fit_args(recipe, "llava", "--data.features", str(tmp_path), "--overwrite")) == 2
    assert "is not a feature cache (no fingerprint.json)" in capsys.readouterr().err


def test_overwrite_replaces_a_cache_of_another_fingerprint(tmp_path, shapes_dir, capsys):
    recipe = frozen_recipe(tmp_path, shapes_dir)
    cache = tmp_path / "cache"
    assert main(build_args(recipe, shapes_dir, cache)) == 0
    assert main(build_args(recipe, shapes_dir, cache, "--model.config.vision.image_size", "32", "--overwrite",
                           "--batch-size", "5", "--device", "cpu")) == 0
    assert json.loads((cache / "fingerprint.json").read_text())["image_size"] == 32
    assert "4 shard(s) built, 0 already done" in capsys.readouterr().out


def test_a_random_train_transform_is_refused(tmp_path, shapes_dir, capsys):
    recipe = frozen_recipe(tmp_path, shapes_dir)
    cache = tmp_path / "cache"
    assert main(build_args(recipe, shapes_dir, cache)) == 0  # augmentation is not in the fingerprint
    capsys.readouterr()
    assert main(fit_args(recipe, "llava", "--data.features", str(cache), "--overwrite",
                         "--model.config.vision.augment", "{scale: [0.5, 1.0]}")) == 2
    assert "the train image transform is random (model.config.vision.augment is set)" in capsys.readouterr().err


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_a_features_batch_without_images_gets_blank_features_not_the_tower(fusion):
    """Multi-rank training runs the fusion of a batch without images on a blank image, so that all
    ranks run the same collectives; in a features run no rank runs the tower, so neither may this
    one: its batch keeps `image_features` (empty) and its blank image is zero features."""
    from types import SimpleNamespace

    from tiny_models import IMAGE_ID, open_gates, tiny_model

    from vlm.data.collate import Collator
    from vlm.data.features import FeatureCollator
    from vlm.data.formats import EncodedSample

    model = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(model, 0.5)
    shape = {"num_tokens": model.vision.num_tokens, "dim": model.vision.dim, "dtype": "float32"}
    collate = FeatureCollator(Collator(pad_id=0, image_id=IMAGE_ID, image_token_count=model.tokens_per_image,
                                       features=True), SimpleNamespace(fingerprint=shape))
    batch = collate([EncodedSample("a", [1, 7, 8, 9], [-100, 7, 8, 9], []), EncodedSample("b", [1, 3], [-100, 3], [])])
    assert batch.pixel_values is None and batch.image_features.shape == (0, shape["num_tokens"], shape["dim"])
    with torch.no_grad():
        plain = model(batch).logits
    model.blank_image_when_missing = True
    model.vision.register_forward_hook(lambda *_: pytest.fail("the tower ran"))
    out = model(batch)
    assert torch.equal(out.logits, plain)
    out.loss.backward()
    assert all(p.grad is not None for p in model.fusion.parameters())
