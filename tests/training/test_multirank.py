"""The shipped recipes on 2 gloo processes under configs/strategy/fsdp2.yaml, with validation
(caption generation whose ranks stop at different steps) and sharded checkpoints: start, finish,
agree on metrics, survive SIGKILL and resume bit for bit, export and initialise from the directory;
cached vision features with a rank whose batch has no image.

Each run is `vlm fit ...` in a subprocess (Lightning starts the second rank) with a timeout that
fails the test instead of hanging. Starting the two ranks is most of a short run's time, so the
runs that need no process of their own share one launch (the `fits` fixture)."""

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import ROOT, pretrain_tower, read_losses, run_ranks, tiny_recipe

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
SHIPPED = [("shapes.yaml", "flamingo"), ("own_data.yaml", "llava")]


@pytest.fixture(scope="module")
def fits(tmp_path_factory, shapes_dir) -> Path:
    """One launch of 2 ranks running, one after the other (tests/training/commands_run.py), each
    SHIPPED recipe in folder `<base>-<fusion>`, then the cached-features runs (`features_fits`),
    then the uninterrupted run the SIGKILL test compares with (`straight`). Returns the folder that
    holds them."""
    root = tmp_path_factory.mktemp("fits")
    commands = []
    for base, fusion in SHIPPED:
        folder = root / f"{base}-{fusion}"
        folder.mkdir()
        ragged = {"class_path": "training_helpers.RaggedStops", "init_args": {"out": str(folder / "val")}}
        commands.append(recipe_args(folder, shapes_dir, fusion, max_steps=2, every=2, extra_callbacks=[ragged], base=base))
    commands += features_fits(root, shapes_dir)
    (root / "straight").mkdir()
    commands.append(recipe_args(root / "straight", shapes_dir, "llava", max_steps=6, every=2))
    (root / "commands.json").write_text(json.dumps(commands))
    run_ranks([str(Path(__file__).with_name("commands_run.py")), str(root / "commands.json")], cwd=root, timeout=TIMEOUT)
    return root


@pytest.mark.parametrize("base, fusion", SHIPPED)
def test_shipped_recipe_trains_validates_and_checkpoints_on_two_ranks(fits, base, fusion):
    folder = fits / f"{base}-{fusion}"
    assert sorted(read_losses(folder / "run")) == [0, 1]
    ranks = [json.loads((folder / "val" / f"val_rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]["lengths"]) == {2} and set(ranks[1]["lengths"]) == {6}  # stopped at different steps
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # reduced across ranks
    assert {"val/loss", "val/exact_match", "val/bleu4", "val/cider_d"} <= set(ranks[0]["metrics"])
    last = folder / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and is_complete(last)
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_sharded_sigkill_resume_is_exact_and_the_directory_exports(tmp_path, shapes_dir, fits):
    killed = tmp_path / "killed"
    killed.mkdir()
    expected = read_losses(fits / "straight" / "run")
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
    from vlm.cli import main

    assert main(["export", "--checkpoint", str(folder / "last.ckpt"), "--out", str(out)]) == 0
    import vlm

    exported = vlm.load_model(out).state_dict()
    module = VLMModule(model.config, init_checkpoint=str(folder / "last.ckpt"))
    module.configure_model()
    for name, value in model.state_dict().items():
        assert torch.equal(exported[name], value), name
        assert torch.equal(module.model.state_dict()[name], value), name


def mixed_shards(shapes_dir: Path, out: Path) -> str:
    """Training shards of two samples: two of captioned images (img-*.tar), two of text only
    (txt-*.tar: the same captions as chat answers). Returns their glob."""
    from vlm.data.decode import iter_shard_samples
    from vlm.data.writer import ShardWriter

    source = sorted((shapes_dir / "caption").glob("train-*.tar"))[0]
    with open(source, "rb") as stream:
        samples = [sample for sample, _ in zip(iter_shard_samples(stream, str(source), max_member_bytes=2**24), range(4))]
    with ShardWriter(out, prefix="img", max_count=2) as images, ShardWriter(out, prefix="txt", max_count=2) as texts:
        for sample in samples:
            images.write({"__key__": sample["__key__"], "png": sample["png"], "txt": sample["txt"]})
            messages = [{"role": "user", "content": "Describe a picture."},
                        {"role": "assistant", "content": sample["txt"].decode()}]
            texts.write({"__key__": f"text_{sample['__key__']}", "json": {"messages": messages}})
    return str(out / "*.tar")


def frozen_vit_args(folder: Path, shapes_dir: Path, train: str, *, tower: Path, checked: bool = True) -> list[str]:
    """`vlm fit` of the tiny recipe (its ViT tower loaded from `tower` and frozen: stage instruct) on
    2 ranks under fsdp2.yaml: 4 steps of 2 samples per rank, each rank's losses and image counts in
    folder/losses; `checked`: validation and a checkpoint every 2 steps. Data seed 2 draws images, per
    step, on rank 0 only, rank 0 only, rank 1 only, both ranks (a batch is a shard: no sample shuffle)."""
    folder.mkdir()
    recipe = tiny_recipe(folder, shapes_dir, max_steps=4, every=2, model__stage="instruct")
    spec = yaml.safe_load(recipe.read_text())
    losses = {"class_path": "training_helpers.Losses", "init_args": {"out": str(folder / "losses")}}
    spec["trainer"].update(devices=2, val_check_interval=2, limit_val_batches=1 if checked else 0)
    spec["trainer"]["callbacks"] = [*spec["trainer"]["callbacks"], losses] if checked else [losses]
    spec["model"].update(caption_samples=2, max_new_tokens=4)
    spec["data"].update(train_shards=train, batch_size=2, val_batch_size=2, shuffle_buffer=1, seed=2)
    recipe.write_text(yaml.safe_dump(spec))
    pretrain_tower(recipe, weights=tower)
    configs = [ROOT / "configs" / "shapes.yaml", ROOT / "configs" / "fusion" / "llava.yaml",
               ROOT / "configs" / "strategy" / "fsdp2.yaml", recipe]
    return ["fit", *[a for c in configs for a in ("--config", str(c))]]


def rank_losses(folder: Path) -> list[dict]:
    return [json.loads((folder / "losses" / f"losses_rank{r}.json").read_text()) for r in (0, 1)]


def features_fits(root: Path, shapes_dir: Path) -> list[list[str]]:
    """The `vlm fit` command lines of the cached-features test, its cache built: `cached` (with
    data.features, validation and checkpoints), `tower` (the same without the cache) and `resumed`
    (`cached` again from its step-2 checkpoint), each in its folder under root."""
    from vlm.cli import main

    train = mixed_shards(shapes_dir, root / "mixed")
    weights = root / "pretrained_tower.pt"
    cached = frozen_vit_args(root / "cached", shapes_dir, train, tower=weights)
    tower, resumed = (frozen_vit_args(root / name, shapes_dir, train, tower=weights, checked=False)
                      for name in ("tower", "resumed"))
    cache = root / "cache"
    assert main(["features", "build", *cached[1:], "--data", train, "--out", str(cache), "--no-progress"]) == 0
    step2 = root / "cached" / "run" / "checkpoints" / "epoch=0-step=2.ckpt"
    return [[*cached, "--data.features", str(cache)], tower,
            [*resumed, "--data.features", str(cache), "--ckpt_path", str(step2)]]


def test_cached_features_train_as_the_tower_does_on_two_ranks_one_without_images(fits):
    """data.features under fsdp2.yaml, where a rank whose batch has no image once ran the tower on
    a blank image while the other did not (mismatched all-gathers): same losses as the tower gives,
    validation on the tower, and the features run resumes from its sharded checkpoint exactly."""
    with_features, with_tower = rank_losses(fits / "cached"), rank_losses(fits / "tower")
    images = [(a > 0, b > 0) for a, b in zip(with_features[0]["images"], with_features[1]["images"])]
    assert images == [(True, False), (True, False), (False, True), (True, True)], images
    for features_rank, tower_rank in zip(with_features, with_tower):
        assert features_rank["steps"] == tower_rank["steps"] == [0, 1, 2, 3]
        assert features_rank["images"] == tower_rank["images"]
        for a, b in zip(features_rank["losses"], tower_rank["losses"]):  # losses near 5
            assert abs(a - b) <= 1e-6, (features_rank["losses"], tower_rank["losses"])
    assert len([row for row in csv_rows(fits / "cached" / "run") if row.get("val/loss")]) == 2  # steps 2 and 4
    for features_rank, resumed_rank in zip(with_features, rank_losses(fits / "resumed")):
        assert resumed_rank["steps"] == [2, 3] and resumed_rank["losses"] == features_rank["losses"][2:]
    last = fits / "cached" / "run" / "checkpoints" / "last.ckpt"
    assert is_complete(last) and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def csv_rows(run_dir: Path) -> list[dict]:
    import csv

    with open(next(run_dir.glob("logs/version_0/metrics.csv"))) as f:
        return list(csv.DictReader(f))


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
