"""Real sharding on CPU: FSDP2 over 2 gloo processes (Lightning launches the second rank by
re-running the script), against one process on the same global batch."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import run_ranks

from vlm.training.export import model_from_checkpoint

SCRIPT = Path(__file__).with_name("fsdp2_run.py")
pytestmark = pytest.mark.slow


def run(out: Path, *args: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    run_ranks([str(SCRIPT), "--out", str(out), *args], cwd=out.parent)


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


@pytest.mark.parametrize("fusion", ["flamingo"])  # llava: under DDP below (each fusion once keeps make test in budget)
def test_a_rank_without_images_does_not_hang(tmp_path, fusion):
    out = tmp_path / "out"
    run(out, "--devices", "2", "--steps", "2", "--fusion", fusion, "--text-only-rank", "1")
    assert len(losses(out, 2)) == 2


@pytest.mark.parametrize("fusion", ["llava"])  # flamingo: under FSDP2 above
def test_a_rank_without_images_does_not_hang_under_ddp(tmp_path, fusion):
    # Without the blank image, DDP waits forever for the vision tower's gradients of the text-only rank.
    out = tmp_path / "out"
    run(out, "--devices", "2", "--strategy", "ddp", "--steps", "2", "--fusion", fusion, "--text-only-rank", "1")
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
    # Delayed scaling all-reduces the amaxes: every rank casts with the single-process scales, so the
    # sharded run must equal one process at 1e-5 (fp8 not applied at all would differ by 3e-3 to 5e-3).
    # Dynamic tensorwise scales come from each rank's own activations (5.5e-4 apart at step 5 with
    # torchao 0.18, tolerance 1e-3); it went through the same FSDP2 + Float8Linear path and was
    # dropped from the suite to keep make test near 15 minutes: `pytest -k fp8_under_fsdp2` with
    # ("tensorwise", 1e-3) added here reruns it.
    ("delayed", 1e-5),
])
def test_fp8_under_fsdp2_matches_single_process_fp8(tmp_path, recipe, tolerance):
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, "--devices", "1", "--plugin", f"fp8:{recipe}")
    run(two, "--devices", "2", "--plugin", f"fp8:{recipe}")
    for a, b in zip(losses(one, 1), losses(two, 2)):
        assert abs(a - b) <= tolerance * abs(a), (losses(one, 1), losses(two, 2))
