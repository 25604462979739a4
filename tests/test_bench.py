"""scripts/bench.py: every benchmark runs end to end at tiny sizes, prints a ratio and writes its JSON."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["--dim", "64", "--layers", "2", "--heads", "4", "--vocab", "512"]
VISION = ["--vision-width", "32", "--vision-layers", "2", "--vision-heads", "2", "--image-size", "16", "--patch", "8",
          "--batch", "2", "--text-tokens", "8", "--gen-prompt", "4", "--gen-tokens", "4"]
TINY = {
    "llama": [*TEXT, "--kv-heads", "2", "--seq", "16", "--batch", "2", "--gen-prompt", "4", "--gen-tokens", "4"],
    "llava": [*TEXT, "--kv-heads", "2", *VISION],
    "flamingo": [*TEXT, *VISION, "--latents", "4", "--resampler-depth", "1"],
    "fusion": ["--steps", "3", "--batch", "2", "--eval-images", "2", "--dim", "32", "--layers", "1"],
    "features": ["--batch", "2", "--image-size", "32", "--text-tokens", "4", "--target", "1.0"],
    "lora": [*TEXT, "--kv-heads", "2", *VISION[:-4], "--memory-steps", "2", "--estimate-base", "configs/shapes.yaml",
             "--estimate-fusions", "configs/fusion/llava.yaml"],
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["llama", "llava", "flamingo"])
def test_pair_benchmark_prints_ratios_and_writes_json(bench, name, tmp_path, capsys):
    assert bench.main([name, *TINY[name], "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train fwd\+bwd tokens/s .* \d+\.\d\dx", out)
    assert re.search(r"greedy generation tokens/s .* \d+\.\d\dx", out)
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert [row["metric"] for row in result["rows"]] == ["train fwd+bwd tokens/s", "greedy generation tokens/s"]
    for row in result["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert math.isclose(row["ratio"], row["ours"] / row[next(k for k in row if k not in ("metric", "ours", "ratio", "target",
                                                                                                    "cpu_time_ratio"))])
    # same weights on both sides: the same loss (checked before timing) and the same greedy tokens
    assert result["checks"] == {"train_loss_equal": True, "greedy_tokens_equal": True}
    assert 0 < result["saved_for_backward_mb"]["ours"] and 0 < result["saved_for_backward_mb"]["theirs"]
    assert result["machine"]["threads"] == 1 and result["command"].startswith(f"python scripts/bench.py {name} ")


def test_profile_prints_both_sides_per_op(bench, tmp_path, capsys):
    assert bench.main(["llama", *TINY["llama"], "--repeats", "1", "--profile", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "profile (train step)" in out and "profile (greedy generation)" in out
    profile = json.loads((tmp_path / "llama.json").read_text())["profile"]
    for what in ("train", "generate"):
        assert profile[what]["totals_ms"]["ours"] > 0 and profile[what]["totals_ms"]["theirs"] > 0
        assert any(op["op"] == "aten::mm" and op["ours_calls"] > 0 and op["theirs_calls"] > 0 for op in profile[what]["ops"])


def test_fusion_benchmark_trains_both_and_plots(bench, tmp_path, capsys):
    assert bench.main(["fusion", *TINY["fusion"], "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train samples/s .* \d+\.\d\dx", out)
    result = json.loads((tmp_path / "fusion.json").read_text())
    assert set(result["losses"]) == {"llava", "flamingo"} and all(len(v) == 3 for v in result["losses"].values())
    # the two fusions saw the same data from the same text and vision weights: first losses agree closely
    assert abs(result["losses"]["llava"][0] - result["losses"]["flamingo"][0]) < 0.3
    rows = {row["metric"]: row for row in result["rows"]}
    assert rows["LM positions per sample"]["llava"] > rows["LM positions per sample"]["flamingo"]  # image tokens in the text
    assert rows["peak train memory MB (estimate)"]["llava"] > rows["  activations saved for bwd MB"]["llava"] > 0
    for name in ("llava", "flamingo"):
        assert 0 <= result["metrics"][name]["exact_match"] <= 1 and result["metrics"][name]["num_images"] == 2
    assert (tmp_path / "fusion_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_all_runs_every_benchmark_with_its_defaults(bench, tmp_path, monkeypatch):
    seen = []
    for name in bench.BENCHMARKS:
        monkeypatch.setattr(bench, f"bench_{name}", lambda args: seen.append(args) or {"rows": []})
    assert bench.main(["all", "--out-dir", str(tmp_path)]) == 0
    assert [a.bench for a in seen] == list(bench.BENCHMARKS)
    assert seen[0].seq == 256 and seen[1].vision_width == 256 and seen[3].steps == 300  # the defaults, not tiny
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(f"{n}.json" for n in bench.BENCHMARKS)


def test_interleaved_alternates_order_and_reports_medians(bench):
    calls = []
    timings = bench.interleaved({"ours": lambda: calls.append("o"), "theirs": lambda: calls.append("t")}, warmup=1, repeats=3)
    assert calls == ["o", "t", "o", "t", "t", "o", "o", "t"]
    assert set(timings) == set(timings.cpu) == {"ours", "theirs"} and all(len(r) == 3 for r in timings.raw.values())


def test_check_close_refuses_different_models(bench):
    bench.check_close("loss", 2.0, 2.0005)
    with pytest.raises(RuntimeError, match="not equivalent"):
        bench.check_close("loss", 2.0, 2.1)


def test_features_benchmark_times_cached_against_tower_steps(bench, tmp_path, capsys):
    assert bench.main(["features", *TINY["features"], "--repeats", "2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"llava: slowest cached step [\d.]+x faster than the fastest tower step", out)
    result = json.loads((tmp_path / "features.json").read_text())
    assert [row["metric"] for row in result["rows"]] == ["llava train steps/s", "flamingo train steps/s"]
    assert set(result["worst_ratio"]) == {"llava", "flamingo"} and all(r > 0 for r in result["worst_ratio"].values())
    assert all(len(runs) == 2 for t in result["timings"].values() for runs in t["runs_wall_cpu_s"].values())


def test_lora_benchmark_profiles_full_lora_and_qlora(bench, tmp_path, capsys):
    assert bench.main(["lora", *TINY["lora"], "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for target in ("LoRA trains >= 95% fewer parameters", "LoRA saves >= 40% of peak memory", "QLoRA's weights <= 35% of bf16's"):
        assert re.search(rf"target {re.escape(target)}.*?[\d.]+%.*\((met|MISSED)\)", out)
    result = json.loads((tmp_path / "lora.json").read_text())
    rows = {row["metric"]: row for row in result["rows"]}
    losses = result["losses"]
    assert losses["lora"][0] == pytest.approx(losses["full"][0], rel=1e-5)  # same base, B = 0: the base's loss
    assert losses["qlora"][0] == pytest.approx(losses["full"][0], abs=0.05)  # NF4's rounding only
    trained = rows["trainable parameters"]
    assert trained["lora"] == trained["qlora"] < trained["full"] and rows["of which LoRA"]["full"] == 0 < rows["of which LoRA"]["lora"]
    for name in ("full", "lora", "qlora"):  # the profiler saw the weights, the new gradients and both AdamW moments at once
        memory = result["memory"][name]
        assert len(memory["step_peak_bytes"]) == 2 and min(memory["step_peak_bytes"]) >= memory["weights_bytes"] + 12 * trained[name]
    assert result["memory"]["qlora"]["weights_bytes"] < result["memory"]["lora"]["weights_bytes"]  # NF4 bases
    assert 0.25 < result["targets"]["qlora_weights_35pct_of_bf16"]["value"] < 0.35  # 4-bit codes + scales vs 16 bits
    assert all(len(runs) == 1 for runs in result["timings"]["train_step"]["runs_wall_cpu_s"].values())
    estimates = result["estimates"]
    assert list(estimates) == ["llava full", "llava lora", "llava qlora", "llava lora bf16-true", "llava qlora bf16-true"]
    assert estimates["llava qlora"]["command"] == ("vlm memory --config configs/shapes.yaml --config configs/fusion/llava.yaml "
                                                   "--config configs/peft/qlora.yaml --devices 1")
    assert estimates["llava lora"]["parameters"]["text"]["lora"] > 0 == estimates["llava full"]["parameters"]["text"]["lora"]
    assert "of which LoRA" in estimates["llava lora"]["table"]
    qlora, lora = (estimates[f"llava {n} bf16-true"]["static_bytes"]["weights"]["frozen"] for n in ("qlora", "lora"))
    assert qlora < lora  # NF4 bases


@pytest.mark.parametrize("name", ["flamingo"])
def test_compile_only_times_eager_regional_and_whole(bench, name, tmp_path, capsys):
    """The compiled columns' code path, traced by dynamo and run eagerly (inductor's code
    generation takes minutes here); the real numbers come from the same command with inductor."""
    assert bench.main([name, *TINY[name], "--repeats", "2", "--compile-only", "--compile-backend", "eager",
                       "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{name}.json").read_text())["compile"]
    for mode in ("eager", "regional", "whole"):
        assert 0 < result[mode]["min_s"] <= result[mode]["median_s"] <= result[mode]["max_s"]
    for mode in ("regional", "whole"):
        assert result[mode]["graphs"] >= 1 and result[mode]["speedup"] > 0 and result[mode]["compile_s"] > 0
    # one graph for the whole step (no break), compiled at most twice (the first call builds RoPE tables)
    assert result["whole"]["graphs"] <= 2
    assert "speed-up" in capsys.readouterr().out
