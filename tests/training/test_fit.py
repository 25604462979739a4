"""`vlm fit` end to end on a tiny shapes shard, for both fusions."""

import math

import pytest
import torch
from training_helpers import fit_args, read_losses, tiny_recipe

from vlm.cli import main
from vlm.training.checkpointing import is_complete


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_fit_loss_falls_and_writes_checkpoints(tmp_path, shapes_dir, fusion):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=30, every=10)
    assert main(fit_args(recipe, fusion)) == 0
    losses = [float(v) for _, v in sorted(read_losses(tmp_path / "run").items())]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in checkpoints} >= {"last.ckpt", "epoch=0-step=30.ckpt"}
    assert all(is_complete(p) for p in checkpoints)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["hyper_parameters"]["config"]["fusion"]["name"] == fusion
    assert state["VLMDataModule"]["batches_consumed"] == 30
    assert list((tmp_path / "run").glob("logs/version_*/captions/step000030.png"))
    # A second run in the same directory replaces the first only when told to.
    assert main(fit_args(recipe, fusion, "--trainer.max_steps", "2", "--overwrite")) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and not (tmp_path / "run" / "checkpoints" / "epoch=0-step=30.ckpt").exists()


def test_fusion_swap_on_the_command_line(tmp_path, shapes_dir):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=2, every=2)
    args = fit_args(recipe, "llava", "--model.config.fusion.name", "flamingo", "--model.config.fusion.options", "{}")
    assert main(args) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("model.fusion.resampler") for k in state["state_dict"])


@pytest.mark.slow
def test_export_load_and_caption(tmp_path, shapes_dir, capsys):
    import vlm

    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=4, every=4)
    assert main(fit_args(recipe, "flamingo")) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "model"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    model = vlm.load_model(out)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[f"model.{name}"]), name
    image = shapes_dir / "probe.png"
    from vlm.data.shapes import draw_scene
    import random

    draw_scene(random.Random(0))[0].save(image)
    capsys.readouterr()
    assert main(["caption", "--model", str(out), str(image), str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(str(image))
    assert main(["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(out)]) == 2


def _tree(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_a_second_run_into_a_finished_run_is_refused_and_touches_nothing(tmp_path, shapes_dir, capsys):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=2, every=2)
    assert main(fit_args(recipe, "llava")) == 0
    before = _tree(tmp_path / "run")
    capsys.readouterr()
    assert main(fit_args(recipe, "llava")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0] and "--ckpt_path last" in err[0] and "--overwrite" in err[0]
    assert str(tmp_path / "run" / "checkpoints") in err[0] and "Traceback" not in err[0]
    assert _tree(tmp_path / "run") == before


def test_vlm_test_and_predict_on_a_trained_recipe(tmp_path, shapes_dir):
    import csv
    import json

    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=2, every=2)
    assert main(fit_args(recipe, "flamingo")) == 0
    val = str(shapes_dir / "caption" / "val-*.tar")
    test = fit_args(recipe, "flamingo", "--data.test_shards", val, "--ckpt_path", "last")
    test[0] = "test"
    assert main(test) == 0
    rows = [row for path in (tmp_path / "run").glob("logs/version_*/metrics.csv") for row in csv.DictReader(open(path))]
    scored = [row for row in rows if row.get("test/cider_d")]
    assert scored and {"test/loss", "test/exact_match", "test/bleu4"} <= {k for k, v in scored[-1].items() if v}

    predictions = tmp_path / "captions.jsonl"
    predict = fit_args(recipe, "flamingo", "--data.predict_shards", val, "--ckpt_path", "last", "--predictions", str(predictions))
    predict[0] = "predict"
    assert main(predict) == 0
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 32 and len({row["key"] for row in lines}) == 32  # every validation sample once
    assert all(isinstance(row["caption"], str) and row["reference"] for row in lines)
    assert [row["key"] for row in lines] == sorted(row["key"] for row in lines)

    missing = fit_args(recipe, "flamingo", "--ckpt_path", str(tmp_path / "nope.ckpt"))
    missing[0] = "test"
    assert main(missing) == 2
