"""Model directories: save -> load is exact, the text part is a Hugging Face Llama, damage is named."""

import dataclasses
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import IMAGE_ID, batch_from, images, open_gates, tiny_model, tiny_model_for

import vlm
from vlm import export
from vlm.export import load_model, load_tensors, load_tokenizer, save_model, save_tensors

ROWS = [[1, IMAGE_ID, 8, 9, 10], [2, 3, IMAGE_ID, 12, IMAGE_ID, 13]]

def _prepared(fusion: str):
    model = tiny_model(fusion, seed=3)
    if fusion == "flamingo":
        open_gates(model, 0.5)  # closed gates would make the fusion weights irrelevant to the logits
    return model


def _logits(model):
    with torch.no_grad():
        return model(batch_from(model, ROWS, [images(1), images(2, seed=1)])).logits


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_round_trip_gives_identical_logits_and_generation(fusion, tmp_path):
    model = _prepared(fusion)
    vlm.save_model(model, tmp_path / "m")
    loaded = vlm.load_model(tmp_path / "m")
    assert not loaded.training and loaded.config == model.config
    assert torch.equal(_logits(loaded), _logits(model))
    prompts, pixels = [[1, IMAGE_ID, 8], [2, IMAGE_ID, 9, 10]], [images(1), images(1, seed=2)]
    assert loaded.generate(pixels, prompts, max_new_tokens=6) == model.generate(pixels, prompts, max_new_tokens=6)
    # The fusion weights really shape these logits, so the equality above covers them.
    with torch.no_grad():
        next(loaded.fusion.parameters()).add_(0.5)
    assert not torch.allclose(_logits(loaded), _logits(model))


def test_text_directory_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _prepared("llava")
    save_model(model, tmp_path / "m")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m" / "text").eval()
    ids = torch.randint(0, model.config.text.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.text(ids), atol=1e-5, rtol=1e-5)


def test_dtype_is_kept_or_converted(tmp_path):
    model = _prepared("flamingo").to(torch.bfloat16)
    save_model(model, tmp_path / "m")
    assert {p.dtype for p in load_model(tmp_path / "m").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(tmp_path / "m", dtype=torch.float32).parameters()} == {torch.float32}


def test_tied_and_non_contiguous_tensors(tmp_path):
    weight = torch.randn(4, 6)
    state = {"a": weight, "tied": weight, "transposed": weight.t(), "rows": weight[1:3]}
    save_tensors(state, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["a", "rows", "transposed"]  # the alias is stored once
    back = load_tensors(tmp_path / "t.safetensors")
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], v) for k, v in state.items())
    # The same through a whole model: a tied pair in the vision tower, a transposed view in the fusion.
    model = _prepared("llava")
    block = model.vision.model.blocks[0]
    block.norm2.weight = block.norm1.weight
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)
        projector = next(p for p in model.fusion.parameters() if p.ndim == 2)
        projector.data = projector.data.t().contiguous().t()
    assert not projector.is_contiguous()
    save_model(model, tmp_path / "m")
    assert torch.equal(_logits(load_model(tmp_path / "m")), _logits(model))


def test_tokenizer_is_saved_and_checked(tokenizer, tmp_path):
    model = tiny_model_for(tokenizer)
    save_model(model, tmp_path / "with", tokenizer=tokenizer)
    assert load_tokenizer(tmp_path / "with").encode("a red circle") == tokenizer.encode("a red circle")
    save_model(model, tmp_path / "without")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "without")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="exceeds the model's 64"):
        save_model(tiny_model("llava"), tmp_path / "small", tokenizer=tokenizer)
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("damage, message", [
    ("shape", r"fusion\.safetensors.*projector\.0\.weight: checkpoint \(3, 5\) vs model \(\d+, \d+\)"),
    ("missing", r"fusion\.safetensors.*missing keys \(1\): projector\.0\.weight"),
    ("unexpected", r"fusion\.safetensors.*unexpected keys \(1\): projector\.9\.weight"),
    ("garbage", r"fusion\.safetensors is not a readable safetensors file"),
])
def test_damaged_fusion_file_is_named(damage, message, tmp_path):
    save_model(_prepared("llava"), tmp_path / "m")
    file = tmp_path / "m" / "fusion.safetensors"
    state = load_file(file)
    assert "projector.0.weight" in state
    if damage == "shape":
        state["projector.0.weight"] = torch.zeros(3, 5)
    elif damage == "missing":
        del state["projector.0.weight"]
    elif damage == "unexpected":
        state["projector.9.weight"] = torch.zeros(2)
    if damage == "garbage":
        file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    else:
        save_file(state, file)
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "m")


def test_config_problems_are_errors(tmp_path):
    model = _prepared("llava")
    # A tower configured from a local checkpoint is rebuilt from the directory, not from that path.
    model.config.vision = dataclasses.replace(model.config.vision, checkpoint_path=str(tmp_path / "gone.safetensors"))
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").config.vision.checkpoint_path is None
    config_file = tmp_path / "m" / "config.json"
    document = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**document, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_model(tmp_path / "m")
    document["config"]["text"]["n_layers"] = 3
    config_file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="n_layers"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_model(tmp_path / "elsewhere")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_model(_prepared("flamingo"), tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: loading a model directory must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    load_model(tmp_path / "m")
    assert not [p for p in (tmp_path / "m").rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".ckpt"}]


def test_overwrite_rules(tmp_path):
    first, second = tiny_model("llava", seed=1), tiny_model("llava", seed=2)
    (tmp_path / "empty").mkdir()
    save_model(first, tmp_path / "empty")  # an empty directory is fine
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(second, tmp_path / "empty")
    assert torch.equal(_logits(load_model(tmp_path / "empty")), _logits(first))
    save_model(second, tmp_path / "empty", overwrite=True)
    assert torch.equal(_logits(load_model(tmp_path / "empty")), _logits(second))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a vlm model directory"):
        save_model(first, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_no_partial_directory(existing, tmp_path, monkeypatch):
    old = tiny_model("flamingo", seed=1)
    if existing:
        save_model(old, tmp_path / "m")
    real = export.save_tensors

    def fail_on_fusion(state, path):
        if path.name == "fusion.safetensors":
            raise OSError("disk full")
        real(state, path)

    monkeypatch.setattr(export, "save_tensors", fail_on_fusion)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model("flamingo", seed=2), tmp_path / "m", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == (["m"] if existing else [])
    if existing:  # the previous model is untouched
        assert torch.equal(_logits(load_model(tmp_path / "m")), _logits(old))


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_modes_follow_the_umask(umask, folder_mode, file_mode, tokenizer, tmp_path):
    old = os.umask(umask)
    try:
        model = tiny_model_for(tokenizer)
        save_model(model, tmp_path / "m", tokenizer=tokenizer)
        save_model(model, tmp_path / "m", tokenizer=tokenizer, overwrite=True)  # the replacing path too
    finally:
        os.umask(old)
    folders = [tmp_path / "m", *(p for p in (tmp_path / "m").rglob("*") if p.is_dir())]
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert {"vision.safetensors", "fusion.safetensors", "tokenizer.json", "config.json"} <= {p.name for p in files}
    assert any(p.suffix == ".safetensors" and p.parent.name == "text" for p in files)
    assert {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders + files} == {
        **{p.relative_to(tmp_path).as_posix(): oct(folder_mode) for p in folders},
        **{p.relative_to(tmp_path).as_posix(): oct(file_mode) for p in files}}
