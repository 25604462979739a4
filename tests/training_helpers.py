"""Tiny recipes for the training tests: everything under a tmp dir, a tiny model, tiny data."""

import os
import signal
from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path: Path, shapes_dir: Path, *, max_steps: int = 12, every: int = 1, **extra) -> Path:
    """An override file: tiny model, tiny data, everything written under tmp_path."""
    out = tmp_path / "run"
    recipe = {
        "trainer": {
            "max_steps": max_steps, "val_check_interval": max_steps, "default_root_dir": str(out),
            "log_every_n_steps": 1, "enable_progress_bar": False,
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}}],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "checkpoints"), "every_n_train_steps": every, "save_last": True, "save_top_k": -1}},
                {"class_path": "vlm.training.CaptionGrid"},
            ],
        },
        "model": {
            "config": {
                "text": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 320, "hidden_dim": 128, "max_seq_len": 128},
                "vision": {"name": "timm", "model": "vit_tiny_patch16_224", "frozen": False, "feature_layer": -1,
                           "image_size": 64, "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}},
            },
            "optim": {"lr": 0.003, "warmup_steps": 2},
            "caption_samples": 8,
            "max_new_tokens": 12,
        },
        "data": {
            "train_shards": str(shapes_dir / "caption" / "train-*.tar"),
            "val_shards": str(shapes_dir / "caption" / "val-*.tar"),
            "tokenizer": str(shapes_dir / "tokenizer.json"),
            "shapes": None,
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 50,
        },
    }
    for key, value in extra.items():
        section, name = key.split("__")
        recipe[section][name] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def pretrain_tower(recipe: Path, fusion: str = "llava", *, weights: Path | None = None) -> Path:
    """Save the recipe's vision tower to `weights` (default: beside the recipe), unless that file
    exists, and load it from there (`model.config.vision.checkpoint_path`): a frozen tower is a
    pretrained one, and `vlm features build` and `vlm fit` then start from the same weights (each
    would draw its own random tower otherwise). Returns the weights file."""
    import torch

    from vlm.training.features import recipe_tower

    configs = [str(ROOT / "configs" / "shapes.yaml"), str(ROOT / "configs" / "fusion" / f"{fusion}.yaml"), str(recipe)]
    weights = weights or recipe.with_name("pretrained_tower.pt")
    if not weights.exists():
        torch.save(recipe_tower(configs)[0].vision.model.state_dict(), weights)
    spec = yaml.safe_load(recipe.read_text())
    spec["model"]["config"]["vision"]["checkpoint_path"] = str(weights)
    recipe.write_text(yaml.safe_dump(spec))
    return weights


def fit_args(recipe: Path, fusion: str = "llava", *more: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "shapes.yaml"), "--config", str(ROOT / "configs" / "fusion" / f"{fusion}.yaml"),
            "--config", str(recipe), *more]


def read_losses(run_dir: Path) -> dict[int, str]:
    """step -> train/loss as written (the CSV keeps Python's round-trip repr)."""
    import csv

    losses = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = row["train/loss"]
    return losses


class Losses(L.Callback):
    """This rank's training loss (`values`), step (`steps`) and batch image count (`images`) at each
    training step; with `out`, written to `out/losses_rank{r}.json` when fit ends."""

    def __init__(self, out: str | None = None) -> None:
        self.out = out
        self.values, self.steps, self.images = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images = getattr(batch, "image_features", None)
        images = getattr(batch, "pixel_values", None) if images is None else images
        self.steps.append(trainer.global_step)
        self.images.append(0 if images is None else len(images))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.out is not None:
            import json

            Path(self.out).mkdir(parents=True, exist_ok=True)
            record = {"steps": self.steps, "losses": self.values, "images": self.images}
            (Path(self.out) / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class KillAtStep(L.Callback):
    """SIGKILLs its own process when training reaches `step`: no clean shutdown, no final save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonBatch(L.Callback):
    """Makes the batch of `step` produce a NaN loss and snapshots the parameters around it."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            batch.pixel_values.fill_(float("nan"))
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}


class RaggedStops(L.Callback):
    """During validation, rank r's captions stop after 2 + 4 * r tokens (rank 0: 2, rank 1: 6),
    as when ranks' rows reach the stop token at different steps; writes, per rank, the caption
    lengths and the validation metrics to `out/val_rank{r}.json`. Generation is itself again after
    each validation (later runs in the same process are not affected)."""

    def __init__(self, out: str) -> None:
        self.out, self.lengths = Path(out), []
        self.restore = None  # the real `vlm.model.decode` while ours is in place

    def on_validation_start(self, trainer, pl_module) -> None:
        import torch

        import vlm.generation as generation
        import vlm.model as model

        if getattr(model.decode, "ragged", False):
            return
        original, real_sample = model.decode, generation.sample_next
        tokenizer = trainer.datamodule.tokenizer
        stop_after, eot, filler = 2 + 4 * trainer.global_rank, tokenizer.eot_id, tokenizer.encode("a")[0]

        def decode(step, first_logits, config, **kwargs):
            calls = [0]

            def sample(logits, cfg, generator=None):
                calls[0] += 1
                token = real_sample(logits, cfg, generator)
                return torch.full_like(token, eot if calls[0] > stop_after else filler)

            generation.sample_next = sample
            try:
                outputs = original(step, first_logits, config, **kwargs)
            finally:
                generation.sample_next = real_sample
            self.lengths += [len(o) for o in outputs]
            return outputs

        decode.ragged = True
        model.decode, self.restore = decode, original

    def on_validation_end(self, trainer, pl_module) -> None:
        import json

        import vlm.model as model

        if self.restore is not None:
            model.decode, self.restore = self.restore, None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"val_rank{trainer.global_rank}.json").write_text(json.dumps({"lengths": self.lengths, "metrics": metrics}))


def run_ranks(command: list[str], *, cwd: Path, timeout: float = 300, expect: int = 0):
    """Run a command that starts more ranks (Lightning re-launches it), in its own process group:
    a hang fails the test after `timeout` seconds and kills every rank, orphans included."""
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if not k.startswith("PL_")}  # no state from in-process runs
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{env.get('PYTHONPATH', '')}")
    process = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:3])} hung for {timeout} s:\n{stderr[-3000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # a rank left behind by a killed launcher
        except ProcessLookupError:
            pass
    assert process.returncode == expect, stderr[-12000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


class SignalAtStep(L.Callback):
    """Sends its own process `signum` (SIGINT: Ctrl-C) when training reaches `step`, once."""

    def __init__(self, step: int, signum: int = int(signal.SIGINT)) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
