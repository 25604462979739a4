"""The README's "Long context" section: its recipe snippet parses into the scaling it names, and its
commands run in order, verbatim but for a tiny model, tiny shards and shorter lengths.

The section is proposed in /tmp/h/longctx-readme.md until the lead pastes it into README.md; this
test reads it from README.md by its heading."""

import json
import re
import shlex

import pytest
import yaml
from test_readme import ROOT, commands

from vlm.cli import main
from vlm.text.llama import LlamaConfig
from vlm.text.rope import YarnScaling

SECTION = "Long context"


def test_recipe_snippet_selects_yarn():
    body = (ROOT / "README.md").read_text().split(f"## {SECTION}", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```yaml\n(.*?)```", body, flags=re.S)
    text = yaml.safe_load(snippet)["model"]["config"]["text"]
    assert LlamaConfig.from_dict(text).rope_scaling == YarnScaling(factor=8, original_max_position_embeddings=256)


def test_long_context_commands_run(tmp_path, monkeypatch, capsys, model_dir):
    sequence = commands(SECTION)
    assert [c.split()[1] for c in sequence] == ["evaluate-context", "evaluate-context"]
    monkeypatch.chdir(tmp_path)
    assert main(["data", "shapes", "--out", "data/shapes", "--train", "4", "--val", "200", "--variants", "caption",
                 "--no-progress"]) == 0
    (tmp_path / "outputs" / "shapes" / "llava").mkdir(parents=True)
    (tmp_path / "outputs" / "shapes" / "llava" / "model").symlink_to(model_dir)
    for command in sequence:
        args = shlex.split(command)[1:]
        lengths = args.index("--lengths")
        args[lengths + 1 : lengths + 5] = ["256", "320"]  # the tiny model's tokenizer spends ~200 tokens on the prompt
        capsys.readouterr()
        assert main(args) == 0, (command, capsys.readouterr().err[-2000:])
    for name, scaling in (("context", None), ("context-yarn", "yarn")):
        report = json.loads((tmp_path / "outputs/shapes/llava" / name / "context.json").read_text())
        assert (report["rope_scaling"] or {}).get("type") == scaling and report["perplexity"]["320"]["windows"] >= 1
        assert (tmp_path / "outputs/shapes/llava" / name / "context.png").exists()


EXTENSION = "Context extension"
EXTENSION_TINY = {
    "trainer": {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1},
    "model": {"config": {"text": {"dim": 32, "n_layers": 1, "hidden_dim": 64}}},
    "data": {"batch_size": 2, "num_workers": 0, "shuffle_buffer": 4},
}


@pytest.mark.slow
def test_context_extension_commands_run(tmp_path, monkeypatch, capsys):
    """The "Context extension" commands in order, verbatim but for a few documents and a tiny model:
    base at 256, exported, extended to 2048 by the shipped recipe (YaRN), exported, evaluated."""
    sequence = commands(EXTENSION)
    assert [c.split()[1] for c in sequence] == ["data", "fit", "export", "data", "fit", "export", "evaluate-context"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(EXTENSION_TINY))
    for command in sequence:
        args = shlex.split(re.sub(r"--val \d+", "--val 4", re.sub(r"--train \d+", "--train 8", command)))[1:]
        if args[0] == "fit":
            args += ["--config", "tiny.yaml"]
        if args[0] == "evaluate-context":
            args += ["--trials", "1", "--windows", "1", "--depths", "0", "1"]
        capsys.readouterr()
        assert main(args) == 0, (command, capsys.readouterr().err[-2000:])
    report = json.loads((tmp_path / "outputs/long_context/yarn/context/context.json").read_text())
    assert report["rope_scaling"]["type"] == "yarn" and report["rope_scaling"]["factor"] == 8
    assert report["lengths"] == [256, 512, 1024, 2048] and report["perplexity"]["2048"]["windows"] == 1
    config = json.loads((tmp_path / "outputs/long_context/yarn/model/config.json").read_text())
    assert "2048" in json.dumps(config)
