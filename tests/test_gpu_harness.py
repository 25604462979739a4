"""The GPU harness without a GPU: the shell script parses, gpu_bench.py runs its whole code path on
a tiny model of the same structure on the CPU, and its FLOP count is vlm.flops' on the 1B shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_bench  # noqa: E402


def test_gpu_check_script_parses_and_runs_every_step_in_order():
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    steps = [line.split()[1] for line in text.splitlines() if line.startswith("step ")]
    assert steps == ["fp8_numerics", "gpu_tests", "multirank", "gpu_bench"]
    limits = [int(line.split()[2]) for line in text.splitlines() if line.startswith("step ")]
    assert sum(limits) <= 600  # one H200 for at most 10 minutes
    for path in ("tests/training/test_fp8.py", "tests/text/test_loss_static.py", "tests/test_compile.py",
                 "scripts/gpu_multirank.py", "scripts/gpu_bench.py"):
        assert path in text and (ROOT / path).is_file()


def test_gpu_bench_tiny_cpu_path_end_to_end(tmp_path):
    rows = ["bf16-eager", "bf16-compiled", "fp8-tensorwise", "transformers-compiled"]
    code = gpu_bench.main(["--tiny", "--device", "cpu", "--compile-backend", "eager", "--steps", "1", "--warmup", "1",
                           "--rows", *rows, "--json", str(tmp_path / "gpu.json"), "--markdown", str(tmp_path / "gpu.md")])
    results = json.loads((tmp_path / "gpu.json").read_text())["results"]
    assert code == 0, results
    assert [r["row"] for r in results] == rows
    for r in results:
        assert r["tokens_per_s"] > 0 and r["train_flops_per_step"] > 0
        assert r["mfu"] == pytest.approx(r["train_flops_per_step"] / r["step_s"] / 989e12)
    table = (tmp_path / "gpu.md").read_text()
    assert all(f"| {row} |" in table for row in rows)


def test_gpu_bench_flops_of_the_1b_shape():
    """Llama-3.2-1B's text FLOPs per token by hand (forward, full attention square at 2048)."""
    from vlm.flops import StepShape, text_flops

    c = gpu_bench.llava_1b().text
    per_token = sum(text_flops(c, StepShape(1, 2048)).values()) / 2048
    layers = 16 * (2 * 2048 * (2048 + 2 * 512) + 2 * 2048 * 2048 + 4 * 2048 * 2048 + 3 * 2 * 2048 * 8192)
    assert per_token == layers + 2 * 2048 * 128257
    assert 2 * 1.23e9 < per_token < 2 * 1.6e9  # about 2 x (1.24 B parameters) + attention


def test_gpu_bench_arguments():
    args = gpu_bench.parse_args(["--device", "cpu", "--tiny", "--rows", "bf16-eager"])
    assert args.seq == 64 and args.peak_tflops == 989.0 and args.rows == ["bf16-eager"]
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--rows", "fp16"])
