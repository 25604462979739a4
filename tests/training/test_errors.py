"""Expected user errors of `vlm fit` are one line on stderr (exit 2) that names the file, key or
value at fault; a run that fails before its first step leaves no log folder behind."""

import pytest
import yaml
from training_helpers import fit_args, tiny_recipe

from vlm.cli import main


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and err[0].startswith("vlm fit: ")
    return err[0]


def test_yaml_key_typo_names_the_file_and_the_nearest_key(tmp_path, shapes_dir, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"model": {"max_new_tokns": 5}}))
    assert main(fit_args(tiny_recipe(tmp_path, shapes_dir), "llava", "--config", str(typo))) == 2
    line = one_error_line(capsys)
    assert str(typo) in line and "model.max_new_tokns" in line and "did you mean model.max_new_tokens" in line


def test_typo_and_bad_value_inside_a_dataclass_valued_key(tmp_path, shapes_dir, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"model": {"optim": {"lrr": 0.1}}}))
    recipe = tiny_recipe(tmp_path, shapes_dir)
    assert main(fit_args(recipe, "llava", "--config", str(typo))) == 2
    line = one_error_line(capsys)
    assert str(typo) in line and "model.optim.lrr" in line and "did you mean model.optim.lr?" in line
    assert main(fit_args(recipe, "llava", "--model.optim.lr", "fast")) == 2
    assert one_error_line(capsys).endswith("command line: model.optim.lr: expected float, got 'fast'")


def test_resuming_a_finished_run_says_so(tmp_path, shapes_dir, capsys):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=2, every=2)
    assert main(fit_args(recipe, "llava")) == 0
    capsys.readouterr()
    assert main(fit_args(recipe, "llava", "--ckpt_path", "last")) == 0  # nothing failed, nothing to do
    line = one_error_line(capsys)
    assert "already at step 2" in line and "nothing to train" in line and "--trainer.max_steps" in line
    assert len(list((tmp_path / "run").glob("logs/version_*"))) == 1  # no empty log folder for it


def test_bad_value_on_the_command_line(tmp_path, shapes_dir, capsys):
    assert main(fit_args(tiny_recipe(tmp_path, shapes_dir), "llava", "--data.batch_size", "many")) == 2
    line = one_error_line(capsys)
    assert "command line" in line and "data.batch_size" in line and "'many'" in line


@pytest.mark.parametrize("flags, named", [
    (["--ckpt_path", "gone/last.ckpt"], "gone/last.ckpt"),
    (["--model.init_checkpoint", "gone/stage1.ckpt"], "gone/stage1.ckpt"),
    (["--model.config.fusion.name", "nope"], "'nope'"),
    (["--data.train_shards", "nowhere/train-*.tar"], "nowhere/train-*.tar"),
])
def test_missing_files_and_unknown_names(tmp_path, shapes_dir, capsys, flags, named):
    recipe = tiny_recipe(tmp_path, shapes_dir)
    assert main(fit_args(recipe, "llava", *flags)) == 2
    assert named in one_error_line(capsys)
    assert not list((tmp_path / "run").glob("logs/version_*")), "empty log folder left behind"


def test_debug_shows_the_traceback(tmp_path, shapes_dir):
    with pytest.raises(Exception, match="nope"):
        main(fit_args(tiny_recipe(tmp_path, shapes_dir), "llava", "--model.config.fusion.name", "nope", "--debug"))


def test_optimizer_flags_are_not_advertised(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--optimizer" not in help_text and "--lr_scheduler" not in help_text
    assert "--model.optim" in help_text and "--overwrite" in help_text


def test_contradictory_trainer_settings_are_one_line(tmp_path, shapes_dir, capsys):
    """Lightning's own configuration errors (here: a progress bar callback with the bar disabled)."""
    recipe = tiny_recipe(tmp_path, shapes_dir)
    spec = yaml.safe_load(recipe.read_text())
    spec["trainer"]["callbacks"].append({"class_path": "vlm.training.StepProgressBar"})
    spec["trainer"]["enable_progress_bar"] = False
    recipe.write_text(yaml.safe_dump(spec))
    assert main(fit_args(recipe, "llava")) == 2
    assert "enable_progress_bar=False" in one_error_line(capsys)
