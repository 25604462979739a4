"""The README's "Mixture of Experts" commands run in order, verbatim but for a tiny model and data.

The section is proposed in /tmp/h/moe-readme.md until the lead pastes it into README.md; this test
reads it from README.md by its heading."""

import pytest
import yaml
from test_readme import ROOT, TINY, commands, tiny

from vlm.cli import main


@pytest.mark.slow
def test_moe_commands_run(tmp_path, monkeypatch, capsys):
    sequence = commands("Mixture of Experts")
    assert [c.split()[1] for c in sequence] == ["fit", "memory", "export", "evaluate"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    recipe = {**TINY, "data": {**TINY["data"], "shapes": {"train": 48, "val": 16}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    for command in sequence:
        capsys.readouterr()
        assert main(tiny(command)) == 0, (command, capsys.readouterr().err[-2000:])
        if command.split()[1] == "memory":
            assert "active per token" in capsys.readouterr().out
    config = (tmp_path / "outputs" / "moe" / "llava" / "model" / "text" / "config.json").read_text()
    assert '"model_type": "vlm_moe"' in config  # capacity 1.5: not a Mixtral
    assert (tmp_path / "outputs" / "moe" / "llava" / "model" / "eval" / "report.json").exists()
