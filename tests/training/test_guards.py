"""Non-finite losses are skipped, counted, and stop the run past a limit."""

import pytest
import torch
from training_helpers import PoisonBatch, fit_args, read_losses, tiny_recipe

from vlm.training.cli import VLMCLI


def test_nonfinite_step_leaves_parameters_unchanged_and_run_continues(tmp_path, shapes_dir):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=6, every=6)
    cli = VLMCLI(args=fit_args(recipe, "llava", "--trainer.callbacks+=training_helpers.PoisonBatch",
                               "--trainer.callbacks.step=3"))
    poison = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PoisonBatch))
    assert poison.before is not None and poison.after is not None
    for name, value in poison.before.items():
        assert torch.equal(value, poison.after[name]), name
    assert cli.model.nonfinite_steps == 1
    assert cli.trainer.global_step == 6  # the skipped batch did not count as a step
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(float(v))) for v in losses.values())


def test_too_many_nonfinite_steps_abort(tmp_path, shapes_dir):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=6, every=6)
    with pytest.raises(RuntimeError, match="non-finite loss"):
        VLMCLI(args=fit_args(recipe, "llava", "--model.max_nonfinite", "0", "--trainer.callbacks+=training_helpers.PoisonBatch",
                             "--trainer.callbacks.step=1"))
