"""MoE backbones in `vlm fit`: configs/moe.yaml builds MoE layers, training logs the expert loads
and the balancing losses, and a run killed with SIGKILL resumes bit for bit, balancing biases
included (they are buffers in the checkpoint, moved after each optimizer step)."""

import csv
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from training_helpers import ROOT, fit_args, read_losses, run_ranks, tiny_recipe

from vlm.text.moe import MoEFeedForward, moe_layers
from vlm.training.cli import VLMCLI
from vlm.training.export import model_from_checkpoint

MOE = {"num_experts": 4, "top_k": 2, "capacity_factor": 1.25, "balance": "bias", "bias_update_rate": 0.01,
       "z_loss_coef": 0.001}


def moe_recipe(tmp_path: Path, shapes_dir: Path, **options) -> Path:
    recipe = tiny_recipe(tmp_path, shapes_dir, **options)
    spec = yaml.safe_load(recipe.read_text())
    spec["model"]["config"]["text"]["moe"] = MOE
    recipe.write_text(yaml.safe_dump(spec))
    return recipe


def test_moe_yaml_makes_every_layer_moe():
    configs = ["shapes.yaml", "fusion/llava.yaml", "moe.yaml"]
    args = [a for name in configs for a in ("--config", str(ROOT / "configs" / name))]
    cli = VLMCLI(args=[*args, "--trainer.logger", "false", "--trainer.accelerator", "cpu"], run=False)
    cli.model.configure_model()
    layers = [layer.feed_forward for layer in cli.model.model.text.layers]
    assert all(isinstance(f, MoEFeedForward) for f in layers)
    assert layers[0].config.num_experts == 4 and layers[0].config.capacity_factor == 1.5


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def biases(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.endswith("expert_bias")}


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_with_balancing_biases(tmp_path, shapes_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run_ranks(["-m", "vlm.cli", *fit_args(moe_recipe(straight, shapes_dir, max_steps=8, every=1))], cwd=straight)
    expected = read_losses(straight / "run")
    assert len(expected) == 8
    logged = [row for row in metric_rows(straight / "run") if row.get("train/moe/aux_loss")]
    assert logged and float(logged[-1]["train/moe/aux_loss"]) > 0  # the router z-loss
    assert {"train/moe/layers.0/load/3", "train/moe/layers.1/dropped", "train/moe/layers.1/bias_spread"} <= set(logged[-1])

    recipe = moe_recipe(killed, shapes_dir, max_steps=8, every=1)
    kill = ["--trainer.callbacks+=training_helpers.KillAtStep", "--trainer.callbacks.step=4"]
    run_ranks(["-m", "vlm.cli", *fit_args(recipe, "llava", *kill)], cwd=killed, expect=-signal.SIGKILL)
    assert sorted(read_losses(killed / "run")) == list(range(4))
    run_ranks(["-m", "vlm.cli", *fit_args(recipe, "llava", "--ckpt_path", "last")], cwd=killed)
    resumed = read_losses(killed / "run")
    for step in range(4, 8):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
    ours, theirs = biases(killed / "run" / "checkpoints" / "last.ckpt"), biases(straight / "run" / "checkpoints" / "last.ckpt")
    assert len(ours) == 2 and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(v.abs().sum() > 0 for v in ours.values())  # the biases moved


class BiasDump(L.Callback):
    """Writes this rank's balancing biases after fit (`out/bias_rank{r}.pt`)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        biases = {name: layer.expert_bias.detach().cpu() for name, layer in moe_layers(pl_module.model)}
        torch.save(biases, self.out / f"bias_rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_fsdp2_ranks_keep_one_bias(tmp_path, shapes_dir):
    """configs/strategy/fsdp2.yaml on 2 gloo ranks, validation and sharded checkpoints on: MoE layers
    shard with their blocks, and the loads are summed over ranks before each bias update, so every
    rank holds the same (moved) biases; the sharded checkpoint holds them."""
    recipe = moe_recipe(tmp_path, shapes_dir, max_steps=4, every=2)
    spec = yaml.safe_load(recipe.read_text())
    spec["trainer"].update(devices=2, val_check_interval=2, limit_val_batches=1)
    spec["trainer"]["callbacks"].append({"class_path": "training.test_moe_fit.BiasDump",
                                         "init_args": {"out": str(tmp_path / "bias")}})
    spec["data"].update(batch_size=4, val_batch_size=4)
    recipe.write_text(yaml.safe_dump(spec))
    args = fit_args(recipe, "llava")
    args[-2:-2] = ["--config", str(ROOT / "configs" / "strategy" / "fsdp2.yaml")]
    run_ranks(["-m", "vlm.cli", *args], cwd=tmp_path, timeout=300)
    assert sorted(read_losses(tmp_path / "run")) == [0, 1, 2, 3]
    ranks = [torch.load(tmp_path / "bias" / f"bias_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]) == 2 and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert all(v.abs().sum() > 0 for v in ranks[0].values())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model, _ = model_from_checkpoint(last)
    saved = {name: layer.expert_bias for name, layer in moe_layers(model)}
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)
