"""Real sharding on CPU: FSDP2 over 2 gloo processes (Lightning launches the second rank by
re-running the script), against one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.training.export import model_from_checkpoint

SCRIPT = Path(__file__).with_name("fsdp2_run.py")
pytestmark = pytest.mark.slow


def run(out: Path, *args: str) -> None:
    # Without the PL_* variables an in-process Lightning run of an earlier test leaves behind
    # (PL_GLOBAL_SEED makes every rank reseed before building the model, the single process not).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PL_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env, capture_output=True,
                            text=True, timeout=300, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-4000:]


def losses(out: Path, ranks: int) -> list[float]:
    per_rank = [json.loads((out / f"losses_rank{r}.json").read_text()) for r in range(ranks)]
    return [sum(step) / ranks for step in zip(*per_rank)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    run(out, "--devices", "1")
    return out


def test_two_ranks_match_one_process_and_checkpoint_consolidates(tmp_path, single):
    out = tmp_path / "out"
    run(out, "--devices", "2", "--activation-checkpointing")  # checkpointing composes with sharding
    one, two = losses(single, 1), losses(out, 2)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    # The sharded checkpoint (one file per rank) loads in this single process.
    model, meta = model_from_checkpoint(out / "final.ckpt")
    assert sorted(p.name for p in (out / "final.ckpt").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    full = load_file(out / "full.safetensors")
    state = model.state_dict()
    assert set(state) == set(full)
    for name, value in full.items():
        assert torch.equal(state[name], value), name
    assert meta["global_step"] == 5


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_a_rank_without_images_does_not_hang(tmp_path, fusion):
    out = tmp_path / "out"
    run(out, "--devices", "2", "--steps", "2", "--fusion", fusion, "--text-only-rank", "1")
    assert len(losses(out, 2)) == 2



def test_tensor_parallel_decoder_matches_one_process(tmp_path, single):
    out = tmp_path / "out"
    run(out, "--devices", "2", "--tensor-parallel", "2")
    for a, b in zip(losses(single, 1), losses(out, 1)):  # both ranks hold the same (replicated) loss
        assert abs(a - b) <= 1e-5 * abs(a)
    model, _ = model_from_checkpoint(out / "final.ckpt")
    full = load_file(out / "full.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, full[name]), name


@pytest.mark.parametrize("recipe, tolerance", [
    # Dynamic scales come from each rank's own activations (half the batch), so rounding differs a little.
    ("tensorwise", 5e-4),
    # Delayed scaling all-reduces the amaxes: every rank casts with the single-process scales.
    ("delayed", 1e-5),
])
def test_fp8_under_fsdp2_matches_single_process_fp8(tmp_path, recipe, tolerance):
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, "--devices", "1", "--plugin", f"fp8:{recipe}")
    run(two, "--devices", "2", "--plugin", f"fp8:{recipe}")
    for a, b in zip(losses(one, 1), losses(two, 2)):
        assert abs(a - b) <= tolerance * abs(a), (losses(one, 1), losses(two, 2))
