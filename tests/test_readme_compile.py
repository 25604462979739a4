"""The README's "Compilation" section: its command trains, verbatim but for a tiny model and data
and for the backend (aot_eager traces the blocks exactly as inductor would, without its minutes of
code generation on the CPU), and logs the compile counters.

The section is proposed in /tmp/h/compile-readme.md until the lead pastes it into README.md; this
test reads it from README.md by its heading."""

import csv
import random

import pytest
import yaml
from test_readme import ROOT, TINY, commands, tiny

from vlm.cli import main
from vlm.data.shapes import draw_scene

SECTION = "Compilation"


@pytest.mark.slow
def test_compilation_command_trains_compiled(tmp_path, monkeypatch):
    (command,) = commands(SECTION)
    assert "--model.compile true" in command and "--model.activation_checkpointing true" in command
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    draw_scene(random.Random(0))[0].save(tmp_path / "image.png")
    assert main(["data", "shapes", "--out", "data/shapes", "--train", "120", "--val", "24", "--no-progress"]) == 0
    args = tiny(command)
    args[args.index("--model.compile") + 1] = "aot_eager"
    assert main([*args, "--trainer.limit_val_batches", "0"]) == 0
    (metrics,) = (tmp_path / "outputs").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/compile/graphs")]
    assert rows and float(rows[-1]["train/compile/graphs"]) >= 1
    assert float(rows[-1]["train/compile/recompiles"]) <= 4 * 2  # at most one per block class
