"""From transformers to vlm fit and back: a tiny llava-hf checkpoint starts a `vlm fit` run
(`python -m vlm.checkpoints.llava_hf DIR` gives its recipe, model.init_checkpoint the weights), and the
trained model exported with `--format transformers` generates vlm's greedy tokens in transformers."""

import json
import random

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from tiny_llava_hf import assert_same_greedy_tokens, save_tiny_llava  # noqa: E402
from training_helpers import fit_args, read_losses, tiny_recipe  # noqa: E402
from vlm import load_model  # noqa: E402
from vlm.caption import Captioner  # noqa: E402
from vlm.checkpoints.llava_hf import main as recipe_main  # noqa: E402
from vlm.cli import main  # noqa: E402
from vlm.data.corpus import write_corpus  # noqa: E402
from vlm.data.shapes import draw_scene, make_shapes_dataset  # noqa: E402
from vlm.text.tokenizer import Tokenizer  # noqa: E402
from vlm.training.export import model_from_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, train=48, val=16, seed=0, workers=0, shard_size=48, variants=("caption",))
    write_corpus(sorted((out / "caption").glob("train-*.tar")), out / "corpus.txt")
    Tokenizer.train([out / "corpus.txt"], 320, show_progress=False).save(out / "tokenizer.json")
    return out


def test_fit_from_llava_hf_and_export_to_transformers(tmp_path, shapes, capsys):
    tokenizer = Tokenizer.from_file(shapes / "tokenizer.json")
    save_tiny_llava(tmp_path / "llava", tokenizer)
    capsys.readouterr()
    assert recipe_main([str(tmp_path / "llava")]) == 0
    start = json.loads(capsys.readouterr().out)
    recipe = tiny_recipe(tmp_path, shapes, max_steps=3, every=3)
    spec = yaml.safe_load(recipe.read_text())
    spec["model"].update(start["model"])
    recipe.write_text(yaml.safe_dump(spec))
    assert main(fit_args(recipe, "llava")) == 0
    losses = [float(v) for v in read_losses(tmp_path / "run").values()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained, _ = model_from_checkpoint(checkpoint)
    # it started from the imported weights: 3 small steps moved them a little (a random start is far off),
    # and the tower's blocks after its feature layer never train
    imported, ours = load_model(tmp_path / "llava").state_dict(), trained.state_dict()
    changes = {k: float((ours[k] - v).abs().max()) for k, v in imported.items()}
    assert 0 < max(changes.values()) < 0.05, max(changes.values())
    assert changes["vision.vision_model.encoder.layers.2.mlp.fc1.weight"] == changes["vision.vision_model.post_layernorm.weight"] == 0
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "transformers"]) == 0
    rng = random.Random(1)
    images = [draw_scene(rng)[0].resize((32, 32)) for _ in range(2)]
    assert_same_greedy_tokens(out, Captioner(trained, tokenizer), images)
