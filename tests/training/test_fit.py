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
    # A second run in the same directory does not trip over the saved config.
    assert main(fit_args(recipe, fusion, "--trainer.max_steps", "2")) == 0


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
