"""LoRA / QLoRA in training (`model.lora`, configs/peft/): what trains with each stage and fusion,
one-line errors naming `model.lora.<field>`, QLoRA quantised once after the precision conversion,
checkpoints that hold only the trained tensors and the base's identity (another base refused),
bitwise resume after SIGKILL, `vlm export` merged and unmerged (PEFT layout), and LoRA and QLoRA
on 2 gloo ranks under configs/strategy/fsdp2.yaml equal to one process (QLoRA's sharding limits
refused in one line)."""

import dataclasses
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import IMAGE_ID, batch_from, open_gates, tiny_model
from training_helpers import ROOT, read_losses, run_ranks, tiny_recipe

import vlm
from vlm.adapters import LoRAConfig, lora_modules, lora_parameters
from vlm.adapters.nf4 import dequantize, is_nf4, quantize_nf4
from vlm.errors import UserError
from vlm.model import build_model
from vlm.stages import STAGES
from vlm.training.lora import CHECKPOINT_KEY, LoRARun
from vlm.training.module import VLMModule
from vlm.training.optim import OptimConfig, build_optimizer

CONFIGS = ROOT / "configs"


def adapter_and_base_names(model) -> tuple[set[str], set[str]]:
    adapters, bases = set(), set()
    for name, module in lora_modules(model).items():
        for param, _ in module.named_parameters(prefix=name):
            (bases if param.startswith(f"{name}.base.") else adapters).add(param)
    return adapters, bases


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("rank", 0), ("alpha", -1), ("dropout", 1.0), ("targets", []),
                                          ("parts", ["txt"]), ("use_dora", "yes"), ("quantize_base", "int4")])
def test_bad_values_name_the_recipe_key(field, value):
    with pytest.raises(ValueError, match=rf"^model\.lora\.{field} must be "):
        VLMModule(tiny_model().config, lora={field: value})
    with pytest.raises(ValueError, match=r"^model\.lora: unknown keys \['rnak'\]"):
        VLMModule(tiny_model().config, lora={"rnak": 4})


def test_recipe_errors_are_one_line(tmp_path, shapes_dir, capsys):
    from vlm.cli import main

    recipe = tiny_recipe(tmp_path, shapes_dir, max_steps=1)
    args = ["fit", *[a for f in ("shapes.yaml", "fusion/llava.yaml", "peft/lora.yaml") for a in ("--config", str(CONFIGS / f))],
            "--config", str(recipe)]
    for flags, line in [
        (["--model.lora.rank", "0"], "vlm fit: model.lora.rank must be a positive integer, got 0"),
        (["--model.lora.rnak", "4"], "vlm fit: command line: unknown key model.lora.rnak (did you mean model.lora.rank?)"),
        (["--model.lora.targets", "[nothing]"], "vlm fit: model.lora.targets: 'nothing' matches no nn.Linear in parts "
                                                "['text'] (names look like 'text.layers.0.attention.wq')"),
    ]:
        assert main([*args, *flags]) == 2
        err = [e for e in capsys.readouterr().err.splitlines() if e.strip()]
        assert len(err) == 1 and err[0].startswith(line), err


@pytest.mark.parametrize("peft, fusion", [("lora.yaml", "llava"), ("qlora.yaml", "flamingo")])
def test_shipped_peft_recipes_adapt_every_block_linear(peft, fusion):
    from vlm.training.cli import VLMCLI

    files = ["llama32_1b_clip/base.yaml", f"llama32_1b_clip/{fusion}.yaml", f"peft/{peft}"]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false"]
    cli = VLMCLI(args=[*[a for f in files for a in ("--config", str(CONFIGS / f))], *cpu], run=False)
    lora = cli.model.lora
    assert cli.model.stage == "align" and lora.parts == ["text"] and (lora.quantize_base == "nf4") == (peft == "qlora.yaml")
    config = cli.model.config
    config.vision.checkpoint_path = None  # structure only
    with torch.device("meta"):
        model = build_model(config)
    names = LoRARun(lora, text_checkpoint=None, init_checkpoint=None).apply(model)
    assert len(names) == 7 * config.text.n_layers  # q, k, v, o and the three SwiGLU linears of every block


# --- what trains -----------------------------------------------------------------------------------

TARGETS = {"llava": ["text.*.attention.wq", "vision.*.attn.qkv", "fusion.projector.0"],
           "flamingo": ["text.*.feed_forward.w2", "vision.*.attn.qkv", "fusion.blocks.*.to_kv"]}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_adapters_and_the_stage_train_and_adapted_linears_never(fusion, stage):
    module = VLMModule(tiny_model(fusion).config, stage=stage,
                       lora={"rank": 2, "parts": ["text", "vision", "fusion"], "targets": TARGETS[fusion]})
    module.configure_model()
    model = module.model.train()
    adapters, bases = adapter_and_base_names(model)
    assert adapters and bases and {n.split(".")[0] for n in adapters} == {"text", "vision", "fusion"}
    whole = {n for n, _ in model.named_parameters() if n.split(".")[0] in STAGES[stage]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters | (whole - bases)
    table = module.parameter_table
    assert sum(table.adapters.values()) == sum(model.get_parameter(n).numel() for n in adapters)
    assert "of which LoRA" in str(table) and table.trainable == sum(model.get_parameter(n).numel() for n in trainable)

    if fusion == "flamingo":
        open_gates(model, 0.5)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.05 * torch.randn_like(p))  # B away from 0: every adapter tensor gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), 10)
    batch = batch_from(model, [[1, IMAGE_ID, 7, 8, 9, 10], [1, IMAGE_ID, 11, 12]],
                       [[torch.randn(3, 16, 16)], [torch.randn(3, 16, 16)]], labels=True)
    model(batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert adapters <= changed <= trainable


def test_qlora_quantises_once_after_the_precision_conversion():
    from lightning.pytorch.plugins.precision import HalfPrecision

    model = tiny_model("llava")
    run = LoRARun(LoRAConfig(rank=2, targets=["text.*.attention.wq"], quantize_base="nf4"),
                  text_checkpoint=None, init_checkpoint=None)
    run.apply(model)
    dense = {n: m.base.weight.detach().clone() for n, m in lora_modules(model).items()}
    model = run.prepare(model, SimpleNamespace(precision_plugin=HalfPrecision("bf16-true")), None)
    expected = {n: dequantize(quantize_nf4(w.to(torch.bfloat16))) for n, w in dense.items()}
    model.to(torch.bfloat16)  # Lightning's conversion after configure_model: nothing re-quantised
    for name, module in lora_modules(model).items():
        assert is_nf4(module.base.weight) and module.base.weight.dtype == torch.bfloat16
        assert torch.equal(dequantize(module.base.weight), expected[name])
    assert run.identity()["quantized_dtype"] == "bfloat16"


def test_qlora_sharding_limits_are_refused_in_one_line():
    """Under FSDP2 an NF4 base is split by rows and by scale groups (torchao's NF4Tensor): a weight
    of one scale group cannot shard over 2 ranks, and one rank or tensor parallelism is refused."""
    from lightning.pytorch.plugins.precision import Precision

    def mesh(data_parallel: int, tensor_parallel: int) -> dict:
        return {"data_parallel": SimpleNamespace(size=lambda: data_parallel),
                "tensor_parallel": SimpleNamespace(size=lambda: tensor_parallel)}

    trainer = SimpleNamespace(precision_plugin=Precision())
    for sizes in ((1, 1), (2, 2)):
        run = LoRARun(LoRAConfig(rank=2, targets=["text.*.attention.wq"], quantize_base="nf4"),
                      text_checkpoint=None, init_checkpoint=None)
        model = tiny_model("llava")
        run.apply(model)
        with pytest.raises(UserError, match=r"^model\.lora\.quantize_base nf4 under configs/strategy/fsdp2\.yaml needs 2"):
            run.prepare(model, trainer, mesh(*sizes))
    config = tiny_model("llava").config
    model = build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, hidden_dim=512)))
    # w1: 512 x 64 = 512 NF4 blocks, 2 scale groups (shardable); wq: 64 x 64 = 64 blocks, one group
    run = LoRARun(LoRAConfig(rank=2, targets=["text.*.feed_forward.w1", "text.layers.3.attention.wq"], quantize_base="nf4"),
                  text_checkpoint=None, init_checkpoint=None)
    run.apply(model)
    with pytest.raises(UserError) as refused:
        run.prepare(model, trainer, mesh(2, 1))
    assert str(refused.value).startswith("model.lora.quantize_base nf4 under FSDP2 on 2 ranks: text.layers.3.attention.wq "
                                         "([64, 64]) has 1 NF4 scale group(s)") and "\n" not in str(refused.value)
    assert not any(is_nf4(m.base.weight) for m in lora_modules(model).values())  # every weight checked first


# --- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_holds_the_trained_tensors_and_refuses_another_base(tmp_path):
    config, lora = tiny_model("llava").config, {"rank": 2, "targets": ["text.*.attention.wq", "fusion.projector.0"],
                                                "parts": ["text", "fusion"]}
    torch.manual_seed(0)
    module = VLMModule(config, stage="align", lora=lora)
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "lora.ckpt")
    loaded = torch.load(tmp_path / "lora.ckpt", weights_only=True)
    params = dict(module.model.named_parameters())
    kept = {k.removeprefix("model.") for k in loaded["state_dict"]}
    assert {n for n, p in params.items() if p.requires_grad} <= kept  # adapters, projector.2
    assert not kept & {n for n, p in params.items() if not p.requires_grad}  # no frozen tensor, no adapted base
    assert "fusion.projector.0.base.weight" not in kept and "fusion.projector.2.weight" in kept
    assert set(loaded[CHECKPOINT_KEY]) >= {"sha256", "text_checkpoint", "init_checkpoint", "lora"}
    module.on_load_checkpoint(loaded)  # the same base: accepted

    torch.manual_seed(1)  # another random base
    other = VLMModule(config, stage="align", lora=lora)
    other.configure_model()
    with pytest.raises(UserError) as refused:
        other.on_load_checkpoint(loaded)
    message = str(refused.value)
    assert loaded[CHECKPOINT_KEY]["sha256"][:12] in message and other.lora_run.sha256[:12] in message
    assert "\n" not in message
    plain = VLMModule(config, stage="align")
    plain.configure_model()
    with pytest.raises(UserError, match="is a LoRA run's checkpoint"):
        plain.on_load_checkpoint(loaded)
    with pytest.raises(UserError, match="is not a checkpoint of a LoRA run"):
        module.on_load_checkpoint({"state_dict": plain.state_dict()})


def test_a_lora_checkpoint_exports_and_starts_another_run_merged(tmp_path):
    """In one process: a checkpoint (flamingo, DoRA, adapters on text, vision and fusion) rebuilt by
    `vlm export`'s reader, saved merged and unmerged, loaded (logits 1e-5), and used as
    model.init_checkpoint of a full fine-tuning run, which starts from the merged weights."""
    from vlm.adapters import merge_lora
    from vlm.training.export import model_from_checkpoint

    config = tiny_model("flamingo").config
    lora = {"rank": 2, "use_dora": True, "parts": ["text", "vision", "fusion"], "targets": TARGETS["flamingo"]}
    module = VLMModule(config, stage="instruct", lora=lora)
    module.configure_model()
    open_gates(module.model, 0.5)  # trained fully by the stage: in the checkpoint
    with torch.no_grad():
        for p in lora_parameters(module.model):
            p.add_(0.05 * torch.randn_like(p))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "lora.ckpt")

    adapted, _ = model_from_checkpoint(tmp_path / "lora.ckpt")
    assert set(lora_modules(adapted)) == set(lora_modules(module.model))
    batch = batch_from(adapted, [[1, IMAGE_ID, 7, 8, 9, 10, 11]], [[torch.randn(3, 16, 16)]])
    with torch.no_grad():
        expected = module.model.eval()(batch).logits
        torch.testing.assert_close(adapted(batch).logits, expected, atol=1e-6, rtol=0)
        for merge in (True, False):
            vlm.save_model(adapted, tmp_path / f"merge{merge}", merge_lora=merge)
            loaded = vlm.load_model(tmp_path / f"merge{merge}")
            assert len(lora_modules(loaded)) == (0 if merge else len(lora_modules(adapted)))
            torch.testing.assert_close(loaded(batch).logits, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "mergeFalse" / "adapter" / "adapter_config.json").is_file()
    assert {k.split(".")[0] for k in load_file(tmp_path / "mergeFalse" / "adapters.safetensors")} == {"vision", "fusion"}

    merged = merge_lora(adapted).state_dict()
    for start in (tmp_path / "lora.ckpt", tmp_path / "mergeFalse"):  # a LoRA checkpoint, an unmerged export
        full = VLMModule(config, stage="full", init_checkpoint=str(start))
        full.configure_model()
        for name, value in full.model.state_dict().items():
            torch.testing.assert_close(value, merged[name], atol=1e-6, rtol=0, msg=name)


def preference_batches(fusion: str, steps: int, *, pairs: int = 2) -> list:
    """`steps` collated batches of `pairs` preference pairs, one image each (seeded)."""
    from vlm.data.collate import Collator
    from vlm.data.formats import EncodedPreference

    g, out = torch.Generator().manual_seed(5), []
    collate = Collator(pad_id=0, image_id=IMAGE_ID, image_token_count=tiny_model(fusion).tokens_per_image)
    for step in range(steps):
        batch = []
        for index in range(pairs):
            prompt = [1, IMAGE_ID, *torch.randint(10, 64, (3,), generator=g).tolist()]
            chosen, rejected = (torch.randint(10, 64, (n,), generator=g).tolist() for n in (4, 5))
            batch.append(EncodedPreference(f"{step}_{index}", prompt + chosen, [-100] * len(prompt) + chosen,
                                           prompt + rejected, [-100] * len(prompt) + rejected,
                                           [torch.randn(3, 16, 16, generator=g)]))
        out.append(collate(batch))
    return out


DPO_LORA = {"lora": ("llava", {"rank": 2, "targets": ["text.*.attention.wq", "text.*.attention.wv"]}),
            "qlora": ("flamingo", {"rank": 2, "quantize_base": "nf4", "parts": ["text", "fusion"],
                                   "targets": ["text.*.feed_forward.*", "fusion.blocks.*.to_q"]})}


@pytest.mark.parametrize("variant", list(DPO_LORA))
def test_dpo_reference_with_lora_is_the_starting_model_without_a_copy(variant):
    """With model.lora the DPO reference is the policy itself, adapters disabled and the tensors the
    stage trains fully (align: the projector; the resampler and cross-attention) at their starting
    values: after training steps that moved all of them, its log-probs are those of the starting
    model built without LoRA (a FrozenReference; its NF4-adapted weights rounded as QLoRA's bases
    are), within 1e-6; the policy comes back bit for bit (values and train mode)."""
    from vlm.training.preference import AdapterReference, FrozenReference, pair_logps

    fusion, lora = DPO_LORA[variant]
    torch.manual_seed(0)
    module = VLMModule(tiny_model(fusion).config, stage="align", objective="dpo", lora=lora)
    module.configure_model()
    model, reference = module.model, module.reference
    assert isinstance(reference, AdapterReference) and reference.model is model  # no second model
    adapters = {id(p) for p in lora_parameters(model)}
    assert reference.start and all(id(model.get_parameter(n)) not in adapters for n in reference.start)
    torch.manual_seed(0)
    plain = VLMModule(tiny_model(fusion).config, stage="align", objective="dpo")
    plain.configure_model()
    base = plain.reference
    assert isinstance(base, FrozenReference) and base.fingerprint == reference.fingerprint
    with torch.no_grad():
        for name, adapted in lora_modules(model).items():
            base.model.get_submodule(name).weight.copy_(dequantize(adapted.base.weight))
        if fusion == "flamingo":  # gates open at the start, as if an earlier stage had trained them: images matter
            for name in reference.start:
                if name.endswith("_gate"):
                    for value in (reference.start[name], model.get_parameter(name), base.model.get_parameter(name)):
                        value.fill_(0.5)
    first, *later = preference_batches(fusion, 4)
    expected = base.logps(first, features=None, loss_type="sigmoid")
    optimizer, _ = build_optimizer(model.train(), OptimConfig(lr=1e-2, warmup_steps=0), 10)
    for batch in later:
        pair_logps(model, batch)[0].sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(model.get_parameter(n), v) for n, v in reference.start.items() if not n.endswith("_gate"))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # (NF4 cannot clone)
    torch.testing.assert_close(reference.logps(first, features=None, loss_type="sigmoid"), expected, atol=1e-6, rtol=0)
    assert model.training and all(torch.equal(model.get_parameter(n), value) for n, value in trained.items())
    table = reference.table([first])  # model.preference.reference cached scores through the same pass
    keys = first.keys[:first.pairs]
    rows = torch.tensor([[table[key][0] for key in keys], [table[key][2] for key in keys]])  # chosen, rejected
    torch.testing.assert_close(rows.flatten(), expected, atol=1e-6, rtol=0)
    assert all(torch.equal(model.get_parameter(n), value) for n, value in trained.items())
    with torch.no_grad():
        assert (pair_logps(model.eval(), first)[0] - expected).abs().max() > 1e-3  # the policy itself moved


@pytest.mark.parametrize("variant", list(DPO_LORA))
def test_dpo_with_lora_trains_from_log_2(variant):
    """vlm's DPO training step with LoRA / QLoRA (DoRA, on text and fusion) in a Lightning fit:
    the first loss is log 2 (policy = reference at B = 0), later ones fall, only the policy's
    trainable tensors move and the reference stays the starting model."""
    import lightning as L
    from training_helpers import Losses

    fusion, lora = DPO_LORA[variant]
    torch.manual_seed(0)
    module = VLMModule(tiny_model(fusion).config, stage="align", objective="dpo", lora=lora, caption_samples=0,
                       optim=OptimConfig(lr=1e-2, warmup_steps=0))
    data = preference_batches(fusion, 1, pairs=4) * 4  # one batch, 4 times: its loss must fall
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None, collate_fn=lambda b: b))
    assert losses.values[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert losses.values[-1] < losses.values[0] - 1e-3, losses.values
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(module.reference.start)


def qlora_recipe(folder: Path, shapes_dir: Path, **extra) -> list[str]:
    """`vlm fit` of shapes + llava + configs/peft/qlora.yaml, tiny: adapters on text wq/wv and on the
    projector's first linear (stage align trains its second one fully); a checkpoint every 3 steps."""
    folder.mkdir()
    recipe = tiny_recipe(folder, shapes_dir, max_steps=6, every=3, model__stage="align",
                         model__lora={"rank": 4, "targets": ["text.*.attention.wq", "text.*.attention.wv", "fusion.projector.0"],
                                      "parts": ["text", "fusion"]}, **extra)
    spec = yaml.safe_load(recipe.read_text())
    spec["trainer"]["logger"][0]["init_args"]["flush_logs_every_n_steps"] = 1  # the killed run's losses on disk
    recipe.write_text(yaml.safe_dump(spec))
    files = [CONFIGS / "shapes.yaml", CONFIGS / "fusion" / "llava.yaml", CONFIGS / "peft" / "qlora.yaml", recipe]
    return ["-m", "vlm.cli", "fit", *[a for f in files for a in ("--config", str(f))]]


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_and_the_checkpoint_exports_merged_and_as_peft(tmp_path, shapes_dir):
    args = qlora_recipe(tmp_path / "fit", shapes_dir)
    kill = ["--trainer.callbacks+=training_helpers.KillAtStep", "--trainer.callbacks.step=5"]
    result = run_ranks([*args, *kill], cwd=tmp_path / "fit", expect=-signal.SIGKILL)
    assert "of which LoRA" in result.stdout + result.stderr  # the parameter table, with its adapter column
    uninterrupted = read_losses(tmp_path / "fit" / "run")
    assert sorted(uninterrupted) == list(range(5))
    run_ranks([*args, "--ckpt_path", "last"], cwd=tmp_path / "fit")  # from the step-3 checkpoint
    resumed = read_losses(tmp_path / "fit" / "run")
    assert sorted(resumed) == list(range(6))
    for step in (3, 4):  # recomputed after the resume: the uninterrupted values, bit for bit
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])

    last = tmp_path / "fit" / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # no NF4 tensor in it
    from vlm.training.export import main as export, model_from_checkpoint

    adapted, _ = model_from_checkpoint(last)
    assert all(is_nf4(m.base.weight) for m in lora_modules(adapted).values())
    frozen = {n for n, p in adapted.named_parameters() if not p.requires_grad}
    assert not {k.removeprefix("model.") for k in checkpoint["state_dict"]} & frozen
    assert checkpoint[CHECKPOINT_KEY]["lora"]["quantize_base"] == "nf4"

    merged, unmerged = tmp_path / "merged", tmp_path / "unmerged"
    assert export(["--checkpoint", str(last), "--out", str(merged)]) == 0
    assert export(["--checkpoint", str(last), "--out", str(unmerged), "--no-merge-lora"]) == 0
    ids = [[1, IMAGE_ID, *torch.randint(10, 300, (9,), generator=torch.Generator().manual_seed(0)).tolist()]]
    pixels = [[torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1))]]
    batch = batch_from(adapted, ids, pixels)
    with torch.no_grad():
        expected = adapted(batch).logits
        for folder, adapters in ((merged, 0), (unmerged, len(lora_modules(adapted)))):
            model = vlm.load_model(folder)
            assert len(lora_modules(model)) == adapters
            torch.testing.assert_close(model(batch).logits, expected, atol=1e-5, rtol=0)
    config = json.loads((unmerged / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((unmerged / "text").resolve())
    assert config["target_modules"] == ["q_proj", "v_proj"]  # the text adapters; the projector's elsewhere
    assert set(load_file(unmerged / "adapters.safetensors")) == {"fusion.projector.0.lora_A", "fusion.projector.0.lora_B"}

    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    hf = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(unmerged / "text"),
                                        unmerged / "adapter").eval()
    text_ids = torch.tensor([ids[0][2:]])
    with torch.no_grad():
        torch.testing.assert_close(hf(text_ids).logits, adapted.text(text_ids), atol=1e-5, rtol=1e-5)


# --- FSDP2 ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_under_fsdp2_train_as_one_process_and_resume_their_sharded_checkpoint(tmp_path):
    """lora_run.py, one launch, for LoRA (flamingo, DoRA adapters on text and fusion), QLoRA (llava,
    adapters on NF4 feed-forward bases) and DPO with that QLoRA, validation and checkpoints every 3
    steps: one process for 6 steps; 2 ranks under configs/strategy/fsdp2.yaml for the same 6 steps
    (1e-5); the 2 ranks again from their step-3 sharded checkpoint (no frozen tensor in it), bit for
    bit. QLoRA's bases stay NF4 when sharded (half the rows per rank) and FSDP2 gathers each once
    per pass: forward and backward (activation checkpointing's recomputation gathers nothing more),
    and DPO's reference pass (the policy with its adapters disabled) before them."""
    run_ranks([str(Path(__file__).with_name("lora_run.py")), "--out", str(tmp_path)], cwd=tmp_path)
    for variant in ("lora", "qlora", "dpo_qlora"):
        check_two_ranks(tmp_path / variant)
    for variant, passes in (("qlora", 2), ("dpo_qlora", 3)):
        one, two = (json.loads((tmp_path / variant / run / "val_rank0.json").read_text()) for run in ("one", "two"))
        bases = len(one["nf4_shards"])
        assert bases == 12 and one["train_gathers"] == [0] * 6  # 4 blocks x w1, w2, w3; one process gathers nothing
        for name, (kind, shape) in two["nf4_shards"].items():
            assert kind == "NF4Tensor" and shape == [one["nf4_shards"][name][1][0] // 2, one["nf4_shards"][name][1][1]]
        assert two["train_gathers"] == [passes * bases] * 6 and two["val_gathers"] == [(passes - 1) * bases] * 2
    for run, ranks in (("one", 1), ("two", 2)):  # the policy starts as its reference
        for rank in range(ranks):
            losses = json.loads((tmp_path / "dpo_qlora" / run / f"losses_rank{rank}.json").read_text())["losses"]
            assert losses[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    from vlm.training.export import model_from_checkpoint

    model, _ = model_from_checkpoint(tmp_path / "qlora" / "resumed" / "checkpoints" / "step=6.ckpt")
    assert len(lora_modules(model)) == 12 and all(is_nf4(m.base.weight) for m in lora_modules(model).values())


def check_two_ranks(folder: Path) -> None:
    """One variant of lora_run.py: 2 ranks = one process (1e-5), resumed = uninterrupted (bitwise),
    the sharded checkpoint holds the trained tensors only and exports."""
    def read(run: str, what: str, ranks: int) -> list[dict]:
        return [json.loads((folder / run / f"{what}_rank{r}.json").read_text()) for r in range(ranks)]

    (one,), two, resumed = read("one", "losses", 1), read("two", "losses", 2), read("resumed", "losses", 2)
    assert one["steps"] == two[0]["steps"] == list(range(6)) and resumed[0]["steps"] == [3, 4, 5]
    for step, (a, b) in enumerate(zip(two[0]["losses"], two[1]["losses"])):
        assert abs((a + b) / 2 - one["losses"][step]) <= 1e-5 * one["losses"][step], (folder.name, step, one, two)
    for rank in (0, 1):
        assert resumed[rank]["losses"] == two[rank]["losses"][3:]
    vals = [*read("one", "val", 1), *read("two", "val", 2), *read("resumed", "val", 2)]
    assert all(abs(v["val_loss"] - vals[0]["val_loss"]) <= 1e-5 * vals[0]["val_loss"] for v in vals)
    assert "of which LoRA" in vals[0]["table"]

    from torch.distributed.checkpoint import FileSystemReader

    from vlm.training.export import model_from_checkpoint

    sharded, plain = folder / "resumed" / "checkpoints" / "step=6.ckpt", folder / "one" / "checkpoints" / "step=6.ckpt"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    stored = {k for k in FileSystemReader(str(sharded)).read_metadata().state_dict_metadata if k.startswith("state_dict.")}
    model, _ = model_from_checkpoint(sharded)
    reference, _ = model_from_checkpoint(plain)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert stored == {f"state_dict.model.{n}" for n in model.state_dict() if n not in frozen}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_B") and p.abs().sum() > 0 for n, p in trained.items())  # the adapters trained
    for name, value in trained.items():  # 6 AdamW steps of lr 1e-2 from gradients equal to rounding (1e-7)
        torch.testing.assert_close(value, reference.get_parameter(name), atol=1e-4, rtol=1e-4)


# --- README ---------------------------------------------------------------------------------------

def test_readme_dpo_with_qlora_command_builds_its_model(tmp_path, monkeypatch):
    """README "LoRA and QLoRA", its command block with configs/stage/dpo.yaml (DPO with QLoRA), at
    tiny size: vlm fit's CLI composes it (DPO on NF4 bases, stage instruct) and the module builds a
    policy whose reference is itself with the adapters disabled. Not trained here: lora_run.py and
    test_dpo_with_lora_trains_from_log_2 train this configuration."""
    from test_readme import TINY, command_blocks, tiny

    from vlm.training.cli import VLMCLI
    from vlm.training.preference import AdapterReference

    (command,) = [c for block in command_blocks("LoRA and QLoRA") for c in block if "configs/stage/dpo.yaml" in c]
    args = tiny(command)
    assert args[0] == "fit" and "configs/peft/qlora.yaml" in args
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(CONFIGS)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cpu = ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--model.init_checkpoint", "null"]
    cli = VLMCLI(args=[*args[1:], *cpu], run=False)
    module = cli.model
    assert module.objective == "dpo" and module.lora.quantize_base == "nf4" and module.stage == "instruct"
    module.configure_model()
    assert isinstance(module.reference, AdapterReference) and module.reference.model is module.model
    assert lora_modules(module.model) and all(is_nf4(m.base.weight) for m in lora_modules(module.model).values())
