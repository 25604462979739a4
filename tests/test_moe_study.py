"""scripts/moe_study.py: its log readers against hand-written logs, and the whole study (dense vs MoE,
both fusions) end to end on a tiny model and data, its JSON and plots checked against the runs' own logs."""

import csv
import importlib.util
import json
import shlex
import statistics
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("moe_study", ROOT / "scripts" / "moe_study.py")
moe_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(moe_study)


def write_tb(folder: Path, points: list[tuple[int, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for step, wall in points:
        writer.add_scalar("train/loss", 1.0, step, walltime=wall)
    writer.close()


def test_step_seconds_is_the_median_gap_per_step_over_versions(tmp_path):
    # steps 9, 19, 29 at 100, 102, 104 s (0.2 s/step), a 30 s validation pause before 39, then a
    # resumed run (version_1) logging 49, 59 at 140, 143 (0.3 s/step): gaps 0.2 0.2 3.2 0.2 0.3
    write_tb(tmp_path / "tb" / "version_0", [(9, 100.0), (19, 102.0), (29, 104.0), (39, 136.0)])
    write_tb(tmp_path / "tb" / "version_1", [(49, 138.0), (59, 141.0)])
    timing = moe_study.step_seconds(tmp_path)
    assert timing["median_s"] == pytest.approx(0.2, abs=1e-6)
    assert timing["intervals"] == 5 and timing["logged_steps"] == 50
    assert timing["logged_span_s"] == pytest.approx(41.0, abs=1e-6)


def test_step_seconds_needs_two_events(tmp_path):
    write_tb(tmp_path / "tb" / "version_0", [(9, 100.0)])
    with pytest.raises(SystemExit, match="fewer than two `train/loss` events"):
        moe_study.step_seconds(tmp_path)


def test_metrics_loads_and_summary_from_a_csv(tmp_path):
    names = ["epoch", "step", "train/loss", "train/moe/layers.1/load/0", "train/moe/layers.1/load/1",
             "train/moe/layers.1/imbalance", "train/moe/layers.1/dropped", "val/loss"]
    rows = [[0, 9, 2.0, 0.75, 0.25, 1.5, 0.1, ""], [0, 19, 1.0, 0.5, 0.5, 1.0, 0.0, ""], ["", 19, "", "", "", "", "", 0.9]]
    (tmp_path / "logs" / "version_0").mkdir(parents=True)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([names, *rows])
    metrics = moe_study.read_metrics(tmp_path)
    assert metrics["train/loss"] == [(9, 2.0), (19, 1.0)] and metrics["val/loss"] == [(19, 0.9)]
    loads = moe_study.expert_loads(metrics)
    assert loads == {"layers.1": {0: [(9, 0.75), (19, 0.5)], 1: [(9, 0.25), (19, 0.5)]}}
    summary = moe_study.moe_summary(metrics, tail=2)
    assert summary == {"layers.1": {"load": [0.625, 0.375], "imbalance": 1.25, "dropped": 0.05}}
    assert moe_study.moe_summary(metrics, tail=1)["layers.1"]["load"] == [0.5, 0.5]


def test_missing_logs_are_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match=r"no logs/version_\* in"):
        moe_study.read_metrics(tmp_path)


TINY = {
    "trainer": {"limit_val_batches": 1, "log_every_n_steps": 1},
    "model": {"config": {"text": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128},
                         "vision": {"name": "timm", "model": "vit_tiny_patch16_224", "frozen": False, "feature_layer": -1,
                                    "image_size": 64, "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2,
                                                                       "num_heads": 2}}},
              "caption_samples": 4, "max_new_tokens": 8},
    "data": {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 20, "shapes": {"train": 48, "val": 16}},
}


def csv_column(run_dir: Path, name: str) -> list[float]:
    rows = csv.DictReader(open(run_dir / "logs" / "version_0" / "metrics.csv"))
    return [float(row[name]) for row in rows if row.get(name)]


@pytest.mark.slow
def test_study_end_to_end_on_tiny_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    bench = tmp_path / "bench"
    args = ["--steps", "4", "--eval-limit", "4", "--tail", "2", "--data", "data/shapes", "--out", "runs", "--validate",
            "--extra-config", "tiny.yaml", "--bench-dir", str(bench)]
    assert moe_study.main(args) == 0
    results = json.loads((bench / "results.json").read_text())
    assert list(results["runs"]) == ["llava_dense", "llava_moe", "flamingo_dense", "flamingo_moe"]
    for name, run in results["runs"].items():
        run_dir = tmp_path / "runs" / name
        losses = csv_column(run_dir, "train/loss")
        assert run["steps"] == 4 and len(losses) == 4
        assert run["final_train_loss"] == pytest.approx(statistics.fmean(losses[-2:]), abs=1e-4)
        assert run["val_loss"] == csv_column(run_dir, "val/loss")[-1]
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        assert run["eval"]["images"] == 4 and run["eval"]["exact_match"] == report["metrics"]["exact_match"]
        assert 0 < run["step_time"]["median_s"] < 60 and run["step_time"]["intervals"] == 3
        assert [c["command"].split()[1] for c in run["commands"]] == ["fit", "export", "evaluate"]
        assert run["commands"][0]["cpu_seconds"] > 0
        assert run["fit_cpu_s_per_step"] == pytest.approx(run["commands"][0]["cpu_seconds"] / 4, abs=1e-4)
        p = run["parameters"]
        if name.endswith("dense"):
            assert p["total"] == p["active"] and run["moe"] == {} and "moe.yaml" not in run["commands"][0]["command"]
            continue
        # 4 experts of width 128 / top-2 = 64: active text = the dense text + the routers (2 layers x 4 x 64)
        dense = results["runs"][name.replace("moe", "dense")]["parameters"]
        assert p["text_active"] == dense["text_total"] + 2 * 4 * 64
        assert p["text_total"] == dense["text_total"] + 2 * 4 * 64 + 2 * 2 * 3 * 64 * 64
        assert "expert_hidden_dim=64" in run["commands"][0]["command"]
        assert list(run["moe"]) == ["layers.0", "layers.1"]
        shares = csv_column(run_dir, "train/moe/layers.1/load/2")
        assert run["curves"]["expert_load"]["layers.1"]["2"] == [[s, v] for s, v in zip(range(4), shares)]
        assert run["moe"]["layers.1"]["load"][2] == pytest.approx(statistics.fmean(shares[-2:]), abs=1e-4)
        assert sum(run["moe"]["layers.0"]["load"]) == pytest.approx(1, abs=1e-3)
    for png in ("summary.png", "expert_load_llava.png", "expert_load_flamingo.png"):
        assert (bench / png).stat().st_size > 5000
    out = capsys.readouterr().out
    assert "| llava | moe | 4 |" in out and "| flamingo | dense | 4 |" in out

    # --evaluate-only exports and evaluates again (here on 6 images), keeping the fit commands and their timings
    assert moe_study.main([*args, "--evaluate-only", "--eval-limit", "6"]) == 0
    again = json.loads((bench / "results.json").read_text())
    for name, run in again["runs"].items():
        assert run["eval"]["images"] == 6 and run["commands"][0] == results["runs"][name]["commands"][0]
        assert [c["command"].split()[1] for c in run["commands"]] == ["fit", "export", "evaluate"]
        assert "--limit 6" in run["commands"][2]["command"]
        assert run["fit_cpu_s_per_step"] == results["runs"][name]["fit_cpu_s_per_step"]
        assert run["step_time"] == results["runs"][name]["step_time"]

    # --from-runs trains and evaluates nothing and reads the same numbers back
    assert moe_study.main([*args, "--from-runs"]) == 0
    final = json.loads((bench / "results.json").read_text())
    assert final["runs"] == again["runs"] and final["settings"]["from_runs"]


def test_readme_quotes_the_committed_study():
    """The README's "Mixture of Experts" section runs this script with the committed results' settings
    and quotes their held-out exact matches (proposed in /tmp/h/moestudy-readme.md until it is pasted)."""
    body = (ROOT / "README.md").read_text().split("## Mixture of Experts", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in body.splitlines() if line.strip().startswith("python scripts/moe_study.py")]
    assert lines, "no `python scripts/moe_study.py` command in the README's Mixture of Experts section"
    results = json.loads((ROOT / "benchmarks" / "moe_study" / "results.json").read_text())
    study = moe_study.build_parser().parse_args(shlex.split(lines[0])[2:])
    assert study.steps == results["settings"]["steps"] and not study.from_runs
    for name, run in results["runs"].items():
        assert f"{100 * run['eval']['exact_match']:.1f}%" in body, name
