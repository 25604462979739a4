"""scripts/bench_packing.py runs end to end at a tiny size for both fusions: the same mean loss packed
and padded, the same real tokens, packed rows fuller than padded ones, medians and min-max in its JSON."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--samples", "16", "--max-len", "160", "--batch", "4", "--packed-rows", "2", "--dim", "32", "--layers", "2",
        "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--image-size", "16", "--repeats", "2"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_packing", ROOT / "scripts" / "bench_packing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_packing_benchmark_runs_and_reports(tmp_path, capsys, fusion):
    assert load_script().main([*TINY, "--fusion", fusion, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"packed / padded: \d+\.\d\dx median", out) and "min-max" in out
    result = json.loads((tmp_path / f"packing-{fusion}.json").read_text())
    assert result["loss_relative_difference"] <= 1e-5 and result["batches"]["padded"] == 4
    assert result["fill"]["packed"] > result["fill"]["padded"]
    assert result["positions"]["packed"] < result["positions"]["padded"]
    for side in ("padded", "packed"):
        rates = result["tokens_per_s"][side]
        assert 0 < rates["min"] <= rates["median"] <= rates["max"] and math.isfinite(rates["max"])
    assert result["target"] == 1.8 and isinstance(result["target_met"], bool) and result["ratio"]["cpu_time"] > 0
    assert "in process CPU time" in out and len(result["ratio"]["per_repeat"]) == 2
    assert result["target_met"] == (min(result["ratio"]["per_repeat"]) >= 1.8)


def test_samples_are_deterministic_and_kinds_are_mixed():
    bench = load_script()
    args = bench.parse_args(TINY)
    first, again = bench.make_samples(args, 4), bench.make_samples(args, 4)
    assert [(s.key, s.input_ids, s.labels) for s in first] == [(s.key, s.input_ids, s.labels) for s in again]
    assert {s.key.rstrip("0123456789") for s in first} == {"caption", "chat", "interleaved"}
    for sample in first:
        assert sample.input_ids.count(bench.IMAGE_ID) == len(sample.images)
        assert len(sample.input_ids) + 3 * len(sample.images) <= 160
