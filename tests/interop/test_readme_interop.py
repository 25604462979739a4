"""The README's "Interoperability" section runs: its commands in order at tiny size (a CLIP-tower
LLaVA trained, exported to transformers and to vlm, VQA-scored, imported back and fine-tuned, captioned
from the llava-hf directory), then its Python example in transformers."""

import random
import re
import shlex
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")

from vlm.checkpoints import llava_hf  # noqa: E402
from vlm.cli import main  # noqa: E402
from vlm.data.shapes import draw_scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTION = "Interoperability"
TINY = {  # no vision key: the section's command sets the tower
    "trainer": {"max_steps": 3, "val_check_interval": 3, "limit_val_batches": 1, "log_every_n_steps": 1},
    "model": {"config": {"text": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128}},
              "caption_samples": 4, "max_new_tokens": 8},
    "data": {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 20, "shapes": None},
}


def section(readme: Path = ROOT / "README.md") -> str:
    text = readme.read_text()
    assert f"\n## {SECTION}\n" in text, f"README.md has no '## {SECTION}' section"
    return text.split(f"\n## {SECTION}\n", 1)[1].split("\n## ", 1)[0]


def commands(text: str) -> list[str]:
    """The indented command lines of the section (vlm ... and python -m vlm...)."""
    return [line.strip() for line in text.splitlines()
            if line.startswith("    vlm ") or line.startswith("    python -m vlm")]


def run(command: str) -> int:
    args = shlex.split(command.split(" # ", 1)[0])
    if args[:2] == ["python", "-m"]:
        assert args[2] == "vlm.checkpoints.llava_hf", command
        return llava_hf.main(args[3:])
    args = args[1:]
    if args[0] == "fit":  # tiny sizes right after the shapes recipe: the section's later files and flags win
        at = args.index("configs/shapes.yaml") + 1
        args = [*args[:at], "--config", "tiny.yaml", *args[at:]]
    return main(args)


@pytest.mark.slow
def test_interoperability_section_runs(tmp_path, monkeypatch):
    text = section()
    lines = commands(text)
    assert [re.split(r"\s+", c)[1] if c.startswith("vlm") else "recipe" for c in lines] == [
        "fit", "export", "export", "evaluate", "recipe", "fit", "caption"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    draw_scene(random.Random(0))[0].save(tmp_path / "image.png")
    assert main(["data", "shapes", "--out", "data/shapes", "--train", "120", "--val", "24", "--no-progress"]) == 0
    for command in lines:
        assert run(command) == 0, command
    assert (tmp_path / "outputs" / "shapes" / "from-hf" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "outputs" / "shapes" / "llava-clip" / "model" / "eval" / "report.json").exists()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(snippet, "README.md", "exec"), {})
