"""The shipped recipes on 2 gloo processes under configs/strategy/fsdp2.yaml, with validation
(caption generation whose ranks stop at different steps) and sharded checkpoints: start, finish,
agree on metrics, survive SIGKILL and resume bit for bit, export and initialise from the directory.

Each run is `python -m vlm.cli fit ...` in a subprocess (Lightning starts the second rank) with a
timeout that fails the test instead of hanging."""

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import ROOT, read_losses, run_ranks

from vlm.training.checkpointing import is_complete, latest_complete_checkpoint

pytestmark = pytest.mark.slow
TIMEOUT = 300


def recipe_args(tmp_path: Path, shapes_dir: Path, fusion: str, *, max_steps: int, every: int, extra_callbacks=(),
                base: str = "shapes.yaml") -> list[str]:
    """The shipped recipe + fusion + fsdp2.yaml, with test-sized steps, data and outputs."""
    out = tmp_path / "run"
    overrides = {
        "trainer": {
            "devices": 2, "max_steps": max_steps, "val_check_interval": every, "limit_val_batches": 2,
            "log_every_n_steps": 1, "enable_progress_bar": False, "default_root_dir": str(out),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}}],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "checkpoints"), "every_n_train_steps": every, "save_last": True, "save_top_k": -1}},
                {"class_path": "vlm.training.CaptionGrid"},
                *extra_callbacks,
            ],
        },
        "model": {"caption_samples": 8, "max_new_tokens": 8},
        "data": {"train_shards": str(shapes_dir / "caption" / "train-*.tar"),
                 "val_shards": str(shapes_dir / "caption" / "val-*.tar"),  # one shard for two ranks
                 "tokenizer": str(shapes_dir / "tokenizer.json"), "shapes": None,
                 "batch_size": 4, "val_batch_size": 4, "num_workers": 0, "shuffle_buffer": 20},
    }
    if base == "own_data.yaml":  # its tokenizer is trained on the training captions, under 2 ranks
        del overrides["data"]["tokenizer"]
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(overrides))
    configs = [ROOT / "configs" / base, ROOT / "configs" / "fusion" / f"{fusion}.yaml",
               ROOT / "configs" / "strategy" / "fsdp2.yaml", path]
    return ["fit", *[a for c in configs for a in ("--config", str(c))]]


def run_cli(args: list[str], cwd: Path, *, expect: int = 0):
    return run_ranks(["-m", "vlm.cli", *args], cwd=cwd, timeout=TIMEOUT, expect=expect)


# each shipped base recipe and each fusion once (the two bases share their model; crossing them keeps make test in budget)
@pytest.mark.parametrize("base, fusion", [("shapes.yaml", "flamingo"), ("own_data.yaml", "llava")])
def test_shipped_recipe_trains_validates_and_checkpoints_on_two_ranks(tmp_path, shapes_dir, base, fusion):
    ragged = {"class_path": "training_helpers.RaggedStops", "init_args": {"out": str(tmp_path / "val")}}
    run_cli(recipe_args(tmp_path, shapes_dir, fusion, max_steps=2, every=2, extra_callbacks=[ragged], base=base), tmp_path)
    assert sorted(read_losses(tmp_path / "run")) == [0, 1]
    ranks = [json.loads((tmp_path / "val" / f"val_rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]["lengths"]) == {2} and set(ranks[1]["lengths"]) == {6}  # stopped at different steps
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # reduced across ranks
    assert {"val/loss", "val/exact_match", "val/bleu4", "val/cider_d"} <= set(ranks[0]["metrics"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and is_complete(last)
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_sharded_sigkill_resume_is_exact_and_the_directory_exports(tmp_path, shapes_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run_cli(recipe_args(straight, shapes_dir, "llava", max_steps=6, every=2), straight)
    expected = read_losses(straight / "run")
    assert sorted(expected) == list(range(6))

    kill = {"class_path": "training_helpers.KillAtStep", "init_args": {"step": 5}}
    args = recipe_args(killed, shapes_dir, "llava", max_steps=6, every=2, extra_callbacks=[kill])
    run_cli(args, killed, expect=-signal.SIGKILL)
    folder = killed / "run" / "checkpoints"
    assert latest_complete_checkpoint(folder) is not None
    args = recipe_args(killed, shapes_dir, "llava", max_steps=6, every=2)  # the same run, without the kill
    run_cli([*args, "--ckpt_path", "last"], killed)
    resumed = read_losses(killed / "run")
    for step in (4, 5):  # the steps after the step-4 checkpoint, bit for bit
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])

    # vlm export and model.init_checkpoint read the sharded directory in one process.
    from vlm.training.export import model_from_checkpoint
    from vlm.training.module import VLMModule

    model, meta = model_from_checkpoint(folder / "last.ckpt")
    assert meta["global_step"] == 6
    out = tmp_path / "exported"
    run_cli(["export", "--checkpoint", str(folder / "last.ckpt"), "--out", str(out)], tmp_path)
    import vlm

    exported = vlm.load_model(out).state_dict()
    module = VLMModule(model.config, init_checkpoint=str(folder / "last.ckpt"))
    module.configure_model()
    for name, value in model.state_dict().items():
        assert torch.equal(exported[name], value), name
        assert torch.equal(module.model.state_dict()[name], value), name


def test_a_sharded_directory_without_its_metadata_is_never_last(tmp_path):
    folder = tmp_path / "checkpoints"
    for name, files in {"epoch=0-step=2.ckpt": [".metadata", "meta.pt"], "last.ckpt": [".metadata"]}.items():
        (folder / name).mkdir(parents=True)
        for file in files:
            if file == "meta.pt":
                torch.save({"global_step": 2}, folder / name / file)
            else:
                (folder / name / file).write_bytes(b"x")
        (folder / name / "__0_0.distcp").write_bytes(b"x")
    assert latest_complete_checkpoint(folder) == folder / "epoch=0-step=2.ckpt"
    (folder / "epoch=0-step=2.ckpt" / "meta.pt").write_bytes(b"PK\x03\x04 truncated")
    assert latest_complete_checkpoint(folder) is None


def test_fsdp1_sharded_layout_exports_and_initialises(tmp_path):
    """Lightning's FSDP1 strategy (CUDA only) stores the weights under `model` instead of
    `state_dict`; both readers accept it. The directory is written here as FSDP1 writes it."""
    import torch.distributed.checkpoint as dcp
    from tiny_models import tiny_model

    from vlm.training.export import model_from_checkpoint
    from vlm.training.module import VLMModule

    model = tiny_model("flamingo")
    folder = tmp_path / "last.ckpt"
    dcp.save({"model": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"hyper_parameters": {"config": model.config.to_dict()}, "global_step": 3}, folder / "meta.pt")
    assert latest_complete_checkpoint(tmp_path) == folder
    loaded, meta = model_from_checkpoint(folder)
    module = VLMModule(model.config, init_checkpoint=str(folder))
    module.configure_model()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
        assert torch.equal(module.model.state_dict()[name], value), name
    assert meta["global_step"] == 3
