"""`vlm memory` with MoE decoder layers: total vs active parameters by hand, and the estimate
against the peak measured on a real CPU training step (the profiler harness of test_memory)."""

import pytest
import yaml
from training.test_memory import CONFIGS, caption_batch, measured_peak, real_model, tiny_recipe

from vlm.training.memory import estimate_memory, parameter_counts


def moe_recipe(tmp_path, **moe) -> list[str]:
    files = tiny_recipe(tmp_path, "llava", "full")
    extra = tmp_path / "moe.yaml"
    extra.write_text(yaml.safe_dump({"model": {"config": {"text": {"moe": moe}}}}))
    return [*files[:2], str(CONFIGS / "moe.yaml"), files[2], str(extra)]


def test_total_and_active_parameters(tmp_path):
    files = moe_recipe(tmp_path, num_experts=4, top_k=2, shared_experts=1, first_dense_layers=1)
    model = real_model(files)
    total, active = parameter_counts(model.text)
    experts = 4 * 3 * 192 * 512  # layer 1 only: 4 experts of dim 192, hidden 512
    assert total == sum(p.numel() for p in model.text.parameters())
    assert total - active == experts // 2  # 2 of the 4 experts idle for each token
    note = [n for n in estimate_memory(files).notes if n.startswith("MoE:")]
    assert note == [f"MoE: 1 of 2 decoder layers, 4 experts, token_choice top-2: text parameters {total:,} in total, "
                    f"{active:,} active per token"]


@pytest.mark.parametrize("moe", [
    dict(capacity_factor=None),  # grouped dispatch, nothing dropped
    dict(capacity_factor=1.5),  # padded buffer with room for 1.5 x the even share
    dict(router="expert_choice", balance="none", capacity_factor=None),
], ids=["token_choice", "capacity", "expert_choice"])
def test_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, moe):
    files = moe_recipe(tmp_path, **moe)
    estimate = estimate_memory(files, batch_size=4, seq_len=256).total(False)
    model = real_model(files)
    peak = measured_peak(model, caption_batch(model, 4, 256))
    assert abs(estimate - peak) <= 0.25 * peak, f"estimated {estimate / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"
