"""Exact resume after SIGKILL, and `last` never pointing at a truncated checkpoint."""

import os
import signal
import subprocess
import sys

import pytest
from training_helpers import ROOT, fit_args, read_losses, tiny_recipe

from vlm.cli import main
from vlm.training.checkpointing import is_complete, latest_complete_checkpoint


def _run_cli(args: list[str], tmp_path, *, expect: int | None = None) -> subprocess.CompletedProcess:
    """`vlm ...` in a fresh process. Runs whose losses are compared bit for bit all run this way:
    the same environment (threads, hash seed) in each, and no state left by earlier in-process runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PL_")}
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONPATH"] = f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    code = "import sys; from vlm.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if expect is not None:
        assert result.returncode == expect, result.stderr[-3000:]
    return result


# SIGKILL then --ckpt_path last, bitwise: single process in test_dpo.py::test_dpo_resume_after_sigkill_is_bitwise_exact
# (the same checkpoint and resume path under the DPO objective), sharded on 2 ranks in
# test_multirank.py::test_sharded_sigkill_resume_is_exact_and_the_directory_exports.


def test_truncated_checkpoint_is_never_last(tmp_path, shapes_dir):
    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=4, every=2)
    assert main(fit_args(recipe, "llava")) == 0
    folder = tmp_path / "run" / "checkpoints"
    newest = max(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a crash mid-write with a non-atomic writer
    os.utime(newest)
    assert not is_complete(newest)
    picked = latest_complete_checkpoint(folder)
    assert picked is not None and picked != newest and is_complete(picked)
    for path in folder.glob("*.ckpt"):  # no complete file left: resume starts from scratch
        path.write_bytes(b"PK\x03\x04 truncated")
    assert latest_complete_checkpoint(folder) is None
    assert main(fit_args(recipe, "llava", "--ckpt_path", "last", "--trainer.max_steps", "1")) == 0
    assert not list(folder.glob("*.tmp"))


@pytest.mark.slow
# SIGTERM goes through the same handler (SaveOnInterrupt.SIGNALS); one signal keeps make test in budget
@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_interrupt_saves_a_checkpoint_and_resume_is_exact(tmp_path, shapes_dir, signum):
    straight = tmp_path / "straight"
    straight.mkdir()
    _run_cli(fit_args(tiny_recipe(straight, shapes_dir, max_steps=10, every=100), "llava"), straight, expect=0)
    expected = read_losses(straight / "run")

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    recipe = tiny_recipe(stopped, shapes_dir, max_steps=10, every=100)  # no periodic checkpoint before step 10
    interrupt = ["--trainer.callbacks+=training_helpers.SignalAtStep", "--trainer.callbacks.step=4",
                 f"--trainer.callbacks.signum={int(signum)}"]
    result = _run_cli(fit_args(recipe, "llava", *interrupt), stopped)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "saved" in result.stderr and "--ckpt_path last" in result.stderr
    last = stopped / "run" / "checkpoints" / "last.ckpt"
    assert is_complete(last)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt beside it
    assert not list((stopped / "run").glob("logs/version_0/captions/*.png"))  # no validation on the way out
    import torch

    assert torch.load(last, weights_only=True)["global_step"] == 5  # the step under way was finished
    _run_cli(fit_args(recipe, "llava", "--ckpt_path", "last"), stopped, expect=0)
    resumed = read_losses(stopped / "run")
    assert sorted(resumed) == list(range(10))
    for step in range(5, 10):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
