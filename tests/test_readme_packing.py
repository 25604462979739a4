"""The README's "Packing" command runs, verbatim but for a tiny model and data, and trains on
packed rows (the recorded config has data.packing true; the loss is finite).

The section is proposed in /tmp/h/packing-readme.md until the lead pastes it into README.md; this
test reads it from README.md by its heading."""

import csv

import pytest
import yaml
from test_readme import ROOT, TINY, commands, tiny

from vlm.cli import main


@pytest.mark.slow
def test_packing_command_runs(tmp_path, monkeypatch, capsys):
    (command,) = commands("Packing")
    assert "--data.packing true" in command
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    recipe = {**TINY, "data": {**TINY["data"], "batch_size": 2, "shapes": {"train": 48, "val": 16, "variants": ["caption"]}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(tiny(command)) == 0, (command, capsys.readouterr().err[-2000:])
    run = tmp_path / "outputs" / "packed" / "flamingo"
    (config,) = run.glob("logs/version_*/config.yaml") or run.glob("**/config.yaml")
    assert yaml.safe_load(config.read_text())["data"]["packing"] is True
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    losses = [float(row["train/loss"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert losses and all(loss == loss for loss in losses)
