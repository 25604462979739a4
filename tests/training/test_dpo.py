"""DPO training (`model.objective: dpo`, configs/stage/dpo.yaml): one pass of both answers with the
images encoded once, a reference that never changes and never enters a checkpoint, TRL's metrics in
training and validation, learning on the shapes preference pairs (both fusions), bitwise resume
after SIGKILL, and 2 gloo ranks under the shipped FSDP2 strategy."""

import csv
import dataclasses
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny_models import IMAGE_ID, images, open_gates, tiny_model
from training_helpers import ROOT, read_losses, run_ranks, tiny_recipe

from vlm.data.collate import Collator
from vlm.data.formats import EncodedPreference, EncodedSample
from vlm.data.shapes import DEFAULT_VARIANTS, make_shapes_dataset
from vlm.errors import UserError
from vlm.features import weights_hash
from vlm.model import ModelInput
from vlm.objectives import sequence_logprobs_from_hidden
from vlm.stages import set_trainable
from vlm.training.checkpointing import is_complete
from vlm.training.datamodule import ShapesSpec, VLMDataModule
from vlm.training.module import VLMModule
from vlm.training.preference import (CachedReference, FrozenReference, PreferenceConfig, chosen_rows, pair_logps,
                                     preference_step)
from vlm.training.recipes import fit

CONFIGS = ROOT / "configs"


# --- one pass, images once ---------------------------------------------------------------------

def preference_batch(model, seed: int = 0):
    """Three pairs with 1, 2 and 0 images, prompts and answers of different lengths."""
    return Collator(pad_id=0, image_id=IMAGE_ID, image_token_count=model.tokens_per_image)(preference_pairs(seed))


def preference_pairs(seed: int = 0, size: int = 16) -> list[EncodedPreference]:
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(10, 64, (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for index, count in enumerate((1, 2, 0)):
        prompt = [1, *[IMAGE_ID] * count, *tokens(3 + index)]
        chosen, rejected = tokens(4 + index), tokens(2 + 3 * index)
        pairs.append(EncodedPreference(f"p{index}", prompt + chosen, [-100] * len(prompt) + chosen,
                                       prompt + rejected, [-100] * len(prompt) + rejected, _images(count, index, size)))
    return pairs


def _images(count: int, seed: int, size: int) -> list[torch.Tensor]:
    return [F.interpolate(image[None], size=size)[0] for image in images(count, seed=seed)]


def count_calls(module) -> list[int]:
    """The batch size of each forward call of `module`."""
    calls: list[int] = []
    module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls


def separate_logps(model, batch, rows: slice):
    """Log-probs of some rows in a pass of their own, cut to their own length."""
    length = int(batch.attention_mask[rows].sum(1).max())
    own = ModelInput(batch.input_ids[rows, :length], batch.attention_mask[rows, :length], batch.pixel_values,
                     batch.image_sample_index)
    hidden, _ = model.hidden(own)
    return sequence_logprobs_from_hidden(hidden, model.text.output.weight, batch.labels[rows, :length])


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_one_pass_of_both_answers_equals_separate_passes_and_encodes_each_image_once(fusion):
    model = tiny_model(fusion)
    open_gates(model, 0.5)  # flamingo's images must matter
    batch = preference_batch(model)
    assert batch.pairs == 3 and batch.pixel_values.shape[0] == 3
    calls = count_calls(model.vision)
    with torch.no_grad():
        sums, counts, features = pair_logps(model, batch)
    assert calls == [3] and features.shape[0] == 3  # once, each image of the batch once
    chosen = separate_logps(model, batch, slice(0, 3))
    rejected = separate_logps(model, batch, slice(3, 6))
    torch.testing.assert_close(sums, torch.cat([chosen[0], rejected[0]]), rtol=0, atol=1e-6)
    assert torch.equal(counts, torch.cat([chosen[1], rejected[1]]))
    assert counts.tolist() == (batch.labels != -100).sum(1).tolist() == [4, 5, 6, 2, 5, 8]  # answers only
    # the images matter: other pixels score the rows with images differently, the others alike
    with torch.no_grad():
        blank, _, _ = pair_logps(model, dataclasses.replace(batch, pixel_values=torch.zeros_like(batch.pixel_values)))
    differs = (blank - sums).abs() > 1e-4
    assert differs.tolist() == [True, True, False, True, True, False]


@pytest.mark.parametrize("stage, reference_tower_calls", [("instruct", []), ("full", [3])])
def test_the_reference_reuses_a_frozen_towers_features_and_starts_equal_to_the_policy(stage, reference_tower_calls):
    model = tiny_model("llava")
    reference = FrozenReference(model)
    set_trainable(model, stage)
    batch = preference_batch(model)
    policy_calls, reference_calls = count_calls(model.vision), count_calls(reference.model.vision)
    frozen = stage == "instruct"
    out = preference_step(model, reference, batch, PreferenceConfig(beta=0.5), share_features=frozen)
    assert policy_calls == [3] and reference_calls == reference_tower_calls
    # the policy is its reference at the start: log 2, no reward, and gradients only to the policy
    assert abs(out.loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert out.chosen_rewards.abs().max() < 1e-5 and out.rejected_rewards.abs().max() < 1e-5
    out.loss.backward()
    assert any(p.grad is not None for p in model.text.parameters())
    assert all(p.grad is None and not p.requires_grad for p in reference.model.parameters())
    assert all(p.grad is None for p in model.vision.parameters()) == frozen


def test_cached_features_without_images_run_no_tower():
    # a features run gives every batch image_features, [0, tokens, dim] without images: on a
    # sharded model a rank that ran the tower alone would issue collectives the others do not
    model = tiny_model("llava")
    pairs = [p for p in preference_pairs() if not p.images]
    batch = Collator(pad_id=0, image_id=IMAGE_ID, image_token_count=model.tokens_per_image)(pairs)
    empty = torch.zeros(0, model.tokens_per_image, model.vision.dim)
    model.blank_image_when_missing = True  # as on several ranks
    calls = count_calls(model.vision)
    with torch.no_grad():
        _, counts, _ = pair_logps(model, dataclasses.replace(batch, image_features=empty))
        assert calls == [] and counts.tolist() == [6, 8]
        pair_logps(model, batch)  # no features: the blank image goes through the tower
    assert calls == [1]


def test_sft_weight_adds_the_chosen_answers_mean_token_loss():
    # TRL's loss_type ["sigmoid", "sft"], loss_weights [1, w]: -mean log p over all chosen answer tokens
    model = tiny_model("flamingo")
    open_gates(model, 0.5)
    reference = FrozenReference(model)
    batch = preference_batch(model)
    with torch.no_grad():
        plain = preference_step(model, reference, batch, PreferenceConfig(), share_features=False)
        mixed = preference_step(model, reference, batch, PreferenceConfig(sft_weight=0.7), share_features=False)
        logits = model(chosen_rows(batch)).logits.float()  # naive: full log-softmax, labels shifted by hand
    logps = logits[:, :-1].log_softmax(-1)
    targets = batch.labels[:batch.pairs, 1:]
    picked = [logps[i, t, targets[i, t]] for i in range(batch.pairs) for t in range(targets.shape[1]) if targets[i, t] != -100]
    nll = -torch.stack(picked).mean()
    torch.testing.assert_close(mixed.sft, nll, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed.loss, plain.loss + 0.7 * nll, rtol=0, atol=1e-6)
    assert torch.equal(mixed.margins, plain.margins) and plain.sft is None
    assert "nll_loss" in mixed.metrics() and "nll_loss" not in plain.metrics()


def test_preference_config_errors_name_the_key():
    for bad, words in [({"loss_type": "hinge"}, "loss_type"), ({"beta": 0}, "beta must be > 0"),
                       ({"label_smoothing": 0.5}, "[0, 0.5)"), ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid only"),
                       ({"reference": "trl"}, "reference"), ({"sft_weight": -1}, "sft_weight")]:
        with pytest.raises(ValueError, match=r"model\.preference\.") as error:
            PreferenceConfig(**bad)
        assert words in str(error.value)
    config = tiny_model("llava").config
    with pytest.raises(ValueError, match="model.objective"):
        VLMModule(config, objective="ppo")
    with pytest.raises(ValueError, match="preference.label_smoothing"):
        VLMModule(config, objective="dpo", label_smoothing=0.1)


def test_resume_refuses_a_changed_starting_model():
    module = VLMModule(tiny_model("llava").config, objective="dpo", stage="instruct")
    module.configure_model()
    saved: dict = {}
    module.on_save_checkpoint(saved)
    module.on_load_checkpoint(saved)  # the same start: fine
    saved["preference_reference"]["fingerprint"] = "0" * 64
    with pytest.raises(UserError, match="init_checkpoint"):
        module.on_load_checkpoint(saved)


# --- data ----------------------------------------------------------------------------------------

def test_an_existing_shapes_set_gains_the_preference_variant_and_keeps_its_tokenizer(tmp_path):
    out = tmp_path / "shapes"

    def data(variants, train=8, variant=None):
        spec = ShapesSpec(out=str(out), train=train, val=4, variants=variants)
        shards = str(out / (variant or variants[0]) / "train-*.tar")
        return VLMDataModule(train_shards=shards, tokenizer=str(out / "tokenizer.json"), tokenizer_vocab_size=300, shapes=spec)

    data(["caption"]).prepare_data()  # supervised first: the set and its tokenizer (trained on the captions)
    tokenizer = (out / "tokenizer.json").read_bytes()
    data(["preference"]).prepare_data()  # then DPO: the pairs are added, the tokenizer accepted as it is
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variants"] == ["caption", "preference"]
    assert manifest["counts"]["caption"]["train"]["samples"] == manifest["counts"]["preference"]["train"]["samples"] == 8
    assert (out / "tokenizer.json").read_bytes() == tokenizer and list((out / "preference").glob("train-*.tar"))
    with pytest.raises(UserError, match="lacks variant.*splits differ"):
        data(["chat"], train=9).prepare_data()
    assert ShapesSpec().variants == list(DEFAULT_VARIANTS)


# --- runs on the shapes preference pairs -------------------------------------------------------

@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory, shapes_dir) -> Path:
    """16 training and 8 validation pairs of the shapes preference variant (the shapes tokenizer
    covers them: the same words)."""
    out = tmp_path_factory.mktemp("pairs")
    make_shapes_dataset(out, train=16, val=8, seed=0, workers=0, shard_size=8, variants=["preference"])
    return out


def dpo_recipe(tmp_path: Path, shapes_dir: Path, pairs_dir: Path, *, max_steps: int, every: int, val: str = "val",
               **extra) -> Path:
    """The tiny recipe on preference pairs (lr and batch for memorising 16 pairs in a few dozen steps)."""
    return tiny_recipe(tmp_path, shapes_dir, max_steps=max_steps, every=every,
                       data__train_shards=str(pairs_dir / "preference" / "train-*.tar"),
                       data__val_shards=str(pairs_dir / "preference" / f"{val}-*.tar"),
                       model__optim={"lr": 0.003, "warmup_steps": 2, "weight_decay": 0.0}, **extra)


def dpo_configs(fusion: str, recipe: Path) -> list[Path]:
    return [CONFIGS / "shapes.yaml", CONFIGS / "fusion" / f"{fusion}.yaml", CONFIGS / "stage" / "dpo.yaml", recipe]


def dpo_args(fusion: str, recipe: Path, *more: str) -> list[str]:
    return ["fit", *[a for c in dpo_configs(fusion, recipe) for a in ("--config", str(c))], *more]


def metrics(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if v} for path in sorted(run.glob("logs/version_*/metrics.csv"))
            for row in csv.DictReader(open(path))]


def test_dpo_run_keeps_the_reference_out_of_training_and_checkpoints(tmp_path, shapes_dir, pairs_dir):
    recipe = dpo_recipe(tmp_path, shapes_dir, pairs_dir, max_steps=4, every=4)
    cli = fit(dpo_configs("llava", recipe), tmp_path / "run")
    module = cli.model
    reference, policy = module.reference, module.model
    assert module.objective == "dpo" and module.stage == "instruct"
    assert all(not p.requires_grad and p.grad is None for p in reference.model.parameters())
    assert weights_hash(reference.model) == reference.fingerprint  # unchanged by training
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, reference.model.get_parameter(n))]
    assert any(n.startswith("text.") for n in changed) and any(n.startswith("fusion.") for n in changed)
    assert not any(n.startswith("vision.") for n in changed)  # stage instruct: the tower stays frozen
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in reference.model.parameters())

    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in policy.state_dict()}  # no reference weights
    assert checkpoint["preference_reference"] == {"fingerprint": reference.fingerprint}
    assert checkpoint["hyper_parameters"]["objective"] == "dpo"
    assert checkpoint["hyper_parameters"]["preference"] == {"beta": 0.1, "loss_type": "sigmoid",
                                                            "label_smoothing": 0.0, "reference": "frozen",
                                                            "sft_weight": 0.0}

    rows = metrics(tmp_path / "run")
    trl = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}
    train = [row for row in rows if "train/loss" in row]
    assert len(train) == 4 and {f"train/{name}" for name in trl} <= set(train[0])
    assert float(train[0]["train/loss"]) == pytest.approx(0.6931471805599453, abs=1e-6)  # policy = reference
    val = next(row for row in rows if "val/loss" in row)
    assert {f"val/{name}" for name in trl} | {"val/exact_match", "val/bleu4", "val/cider_d"} <= set(val)
    assert list((tmp_path / "run").glob("logs/version_*/captions/step000004.png"))  # chosen rows' prompts


def test_dpo_needs_preference_batches(tmp_path, shapes_dir, capsys):
    from vlm.cli import main

    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=2, every=2)  # caption shards
    assert main(dpo_args("llava", recipe)) == 2
    err = capsys.readouterr().err
    assert "model.objective dpo trains on preference pairs" in err and "Traceback" not in err


def test_next_token_on_pairs_trains_the_chosen_answers(tmp_path, shapes_dir, pairs_dir):
    # the recipe without configs/stage/dpo.yaml: supervised fine-tuning on the chosen answers
    recipe = dpo_recipe(tmp_path, shapes_dir, pairs_dir, max_steps=2, every=2)
    module = fit([CONFIGS / "shapes.yaml", CONFIGS / "fusion" / "llava.yaml", recipe], tmp_path / "run").model
    assert module.reference is None and module.objective == "next_token"
    rows = metrics(tmp_path / "run")
    assert sum("train/loss" in row for row in rows) == 2 and not any("train/rewards/chosen" in row for row in rows)
    assert any("val/loss" in row and "val/exact_match" in row for row in rows)
    # what it trains: the loss of the chosen answers alone, collated as ordinary samples
    pairs = preference_pairs(size=64)  # the shapes recipe's image size
    collate = Collator(pad_id=0, image_id=IMAGE_ID, image_token_count=module.model.tokens_per_image)
    batch = collate(pairs)
    chosen = collate([EncodedSample(p.key, p.chosen_ids, p.chosen_labels, p.images) for p in pairs])
    with torch.no_grad():
        ours = module.model(module._sft_rows(batch), return_logits=False).loss
        separate = module.model(chosen, return_logits=False).loss
    torch.testing.assert_close(ours, separate, rtol=1e-6, atol=1e-6)


def copy_pairs(pairs_dir: Path, to: Path) -> Path:
    """The pairs in a folder of the test's own (a cached reference writes next to the shards)."""
    shutil.copytree(pairs_dir / "preference", to / "preference")
    return to


def test_cached_reference_equals_the_frozen_copy_and_is_reused(tmp_path, shapes_dir, pairs_dir):
    pairs = copy_pairs(pairs_dir, tmp_path / "pairs")
    runs = {}
    for name, reference in [("frozen", "frozen"), ("cached", "cached"), ("again", "cached")]:
        (tmp_path / name).mkdir()
        recipe = dpo_recipe(tmp_path / name, shapes_dir, pairs, max_steps=3, every=3)
        cli = fit(dpo_configs("llava", recipe), tmp_path / name / "run",
                  overrides=[f"--model.preference.reference={reference}", "--model.caption_samples=0"])
        runs[name] = [row for row in metrics(tmp_path / name / "run") if "train/loss" in row or "val/loss" in row]
        if name == "cached":
            assert isinstance(cli.model.reference, CachedReference)  # the frozen copy is gone
            assert cli.model.reference.fingerprint == torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt",
                                                                 weights_only=True)["preference_reference"]["fingerprint"]
            files = sorted(pairs.glob("preference/*.reference-*.json"))
            assert [f.name.split(".")[0] for f in files] == ["train-000000", "train-000001", "val-000000"]
            written = {f: f.stat().st_mtime_ns for f in files}
            stored = json.loads(files[0].read_text())
            assert len(stored["logps"]) == 8 and stored["settings"]["fingerprint"] == cli.model.reference.fingerprint
    assert {f: f.stat().st_mtime_ns for f in written} == written  # the third run read them
    for name in ("cached", "again"):
        assert len(runs[name]) == len(runs["frozen"]) == 4
        for row, expected in zip(runs[name], runs["frozen"]):
            assert set(row) == set(expected)
            for key in (k for k in row if k.startswith(("train/", "val/")) and k != "train/lr"):
                assert float(row[key]) == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-6), (name, key)


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_dpo_learns_its_training_pairs(tmp_path, shapes_dir, pairs_dir, fusion):
    # validation on the 16 training pairs themselves, after 40 steps of 8 pairs, from scratch
    recipe = dpo_recipe(tmp_path, shapes_dir, pairs_dir, max_steps=40, every=40, val="train")
    # flamingo.yaml opens the gates fully for long supervised runs; from scratch, the random
    # cross-attention then drowns the text for many more steps than this test has
    gates = ["--model.config.fusion.options.gate_init=0.1"] if fusion == "flamingo" else []
    fit(dpo_configs(fusion, recipe), tmp_path / "run", overrides=["--trainer.limit_val_batches=2", *gates])
    rows = metrics(tmp_path / "run")
    val = next(row for row in rows if "val/rewards/accuracies" in row)
    assert float(val["val/rewards/accuracies"]) > 0.9, val
    assert float(val["val/rewards/margins"]) > 0 and float(val["val/loss"]) < 0.5, val


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, shapes_dir) -> Path:
    """A tiny llava captioner trained for 4 steps: the model DPO starts from."""
    from training_helpers import fit_args

    from vlm.cli import main

    tmp = tmp_path_factory.mktemp("sft")
    assert main(fit_args(tiny_recipe(tmp, shapes_dir, max_steps=4, every=4), "llava")) == 0
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_dpo_resume_after_sigkill_is_bitwise_exact(tmp_path, shapes_dir, pairs_dir, sft_checkpoint):
    start = {"model__init_checkpoint": str(sft_checkpoint)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run_ranks(["-m", "vlm.cli", *dpo_args("llava", dpo_recipe(straight, shapes_dir, pairs_dir, max_steps=10, every=1, **start))],
              cwd=straight)
    expected = read_losses(straight / "run")
    assert len(expected) == 10

    recipe = dpo_recipe(killed, shapes_dir, pairs_dir, max_steps=10, every=1, **start)
    kill = ["--trainer.callbacks+=training_helpers.KillAtStep", "--trainer.callbacks.step=5"]
    run_ranks(["-m", "vlm.cli", *dpo_args("llava", recipe, *kill)], cwd=killed, expect=-signal.SIGKILL)
    assert sorted(read_losses(killed / "run")) == list(range(5))
    run_ranks(["-m", "vlm.cli", *dpo_args("llava", recipe, "--ckpt_path", "last")], cwd=killed)  # reference: rebuilt
    resumed = read_losses(killed / "run")
    assert sorted(resumed) == list(range(10))
    for step in range(5, 10):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cached"])  # frozen: sharded on 2 ranks in the test below
def test_dpo_on_two_ranks_under_the_shipped_fsdp2_strategy(tmp_path, shapes_dir, pairs_dir, sft_checkpoint, reference):
    pairs = copy_pairs(pairs_dir, tmp_path / "pairs")
    recipe = dpo_recipe(tmp_path, shapes_dir, pairs, max_steps=4, every=2, model__init_checkpoint=str(sft_checkpoint))
    more = tmp_path / "ranks.yaml"
    more.write_text(yaml.safe_dump({"trainer": {"devices": 2, "val_check_interval": 2, "limit_val_batches": 1},
                                    "data": {"batch_size": 4, "val_batch_size": 4},
                                    "model": {"preference": {"reference": reference}}}))
    configs = [*dpo_configs("llava", recipe)[:3], CONFIGS / "strategy" / "fsdp2.yaml", recipe, more]
    run_ranks(["-m", "vlm.cli", "fit", *[a for c in configs for a in ("--config", str(c))]], cwd=tmp_path, timeout=300)
    assert sorted(read_losses(tmp_path / "run")) == [0, 1, 2, 3]
    val = [row for row in metrics(tmp_path / "run") if "val/rewards/accuracies" in row]
    assert len(val) == 2 and {"val/loss", "val/exact_match", "val/rewards/margins"} <= set(val[-1])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and is_complete(last)
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["preference_reference"]["fingerprint"] and meta["global_step"] == 4
    losses = read_losses(tmp_path / "run")
    assert float(losses[0]) == pytest.approx(0.6931471805599453, abs=1e-5)  # the reference is the start, on both ranks
    assert len(list(pairs.glob("preference/*.reference-*.json"))) == (3 if reference == "cached" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["flamingo"])  # the fusion whose images reach every layer; llava: 2 ranks above
def test_dpo_under_fsdp2_matches_one_process_with_a_rank_without_images(tmp_path, fusion):
    """The reference sharded like the policy and the pair pass under FSDP2's hooks: 2 ranks (the
    second one's pairs without images) train as one process on the whole batch does."""
    script = Path(__file__).with_name("dpo_fsdp2_run.py")
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        run_ranks([str(script), "--out", str(out), "--devices", str(devices), "--fusion", fusion, "--text-only", "2", "3"],
                  cwd=tmp_path)
        runs[devices] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    one = runs[1][0]["losses"]
    two = [sum(step) / 2 for step in zip(*(rank["losses"] for rank in runs[2]))]
    assert len(one) == len(two) == 4 and one[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    assert one[-1] < one[0]
    for rank in (*runs[1], *runs[2]):  # the reference never changed, sharded or not
        assert rank["reference_after"] == rank["fingerprint"] == runs[1][0]["fingerprint"]
