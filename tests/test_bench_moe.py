"""scripts/bench.py moe runs end to end at a tiny size: same losses and greedy tokens as transformers'
Mixtral, ratios printed, medians and min-max written to its JSON."""

import importlib.util
import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "512", "--experts", "4",
        "--seq", "16", "--batch", "2", "--gen-prompt", "4", "--gen-tokens", "4", "--repeats", "2"]


def test_moe_benchmark_against_mixtral(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["moe", *TINY, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train fwd\+bwd tokens/s .* \d+\.\d\dx", out) and "min-max over 2 runs" in out
    result = json.loads((tmp_path / "moe.json").read_text())
    assert result["checks"] == {"train_loss_equal": True, "greedy_tokens_equal": True}
    assert "4 experts top-2" in result["title"]
    for what in ("train", "generate"):
        for side in ("ours", "theirs"):
            low, high = result["spread_tokens_per_s"][what][side].values()
            assert 0 < low <= high and math.isfinite(high)
    assert result["rows"][0]["target"] == 1.5 and result["ours_dispatch"] in ("torch._grouped_mm", "padded bmm")
