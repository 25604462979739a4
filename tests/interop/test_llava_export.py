"""`vlm export --format transformers`: transformers' LlavaForConditionalGeneration and AutoProcessor load
the directory offline, and greedy decoding gives the same tokens as vlm for several prompts and images
(Hugging Face CLIP/SigLIP and open_clip ViT towers); other towers and fusions are refused in one line."""

import dataclasses
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_llava_hf import EXTRA_ROWS, assert_same_greedy_tokens, perturb_norms_and_biases  # noqa: E402
from vlm.caption import Captioner  # noqa: E402
from vlm.checkpoints.llava_hf import save_llava_hf  # noqa: E402
from vlm.cli import main  # noqa: E402
from vlm.data.shapes import draw_scene  # noqa: E402
from vlm.errors import UserError  # noqa: E402
from vlm.fusion import FusionConfig  # noqa: E402
from vlm.model import VLMConfig, build_model  # noqa: E402
from vlm.text.llama import LlamaConfig  # noqa: E402
from vlm.vision import VisionConfig  # noqa: E402

HF_TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
           "image_size": 32, "patch_size": 8}
OPEN_CLIP_TINY = {"embed_dim": 16, "vision_cfg": {"width": 32, "layers": 3, "patch_size": 8, "image_size": 32,
                                                  "head_width": 8}}
TOWERS = {
    "clip-default": VisionConfig(name="hf_vit", model="clip", model_kwargs=HF_TINY, feature_layer=-2),
    "clip-full": VisionConfig(name="hf_vit", model="clip", model_kwargs=HF_TINY, feature_layer=1,
                              keep_prefix_tokens=True),
    "siglip": VisionConfig(name="hf_vit", model="siglip", model_kwargs=HF_TINY, feature_layer=-1),
    "open_clip": VisionConfig(name="open_clip", model="ViT-B-32", model_kwargs=OPEN_CLIP_TINY, feature_layer=-2),
    "open_clip-cls": VisionConfig(name="open_clip", model="ViT-B-32", model_kwargs=OPEN_CLIP_TINY, feature_layer=-1,
                                  keep_prefix_tokens=True),
}


def tiny_vlm(tokenizer, vision: VisionConfig, *, fusion: str = "llava", seed: int = 0):
    torch.manual_seed(seed)
    config = VLMConfig(text=LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                        vocab_size=tokenizer.vocab_size + EXTRA_ROWS, max_seq_len=256),
                       vision=vision, fusion=FusionConfig(fusion, {}), image_token_id=tokenizer.image_id)
    model = build_model(config)
    perturb_norms_and_biases(model, seed)
    return model.eval()


def scenes(count: int, size: int = 32) -> list:
    rng = random.Random(0)
    return [draw_scene(rng)[0].resize((size, size)) for _ in range(count)]


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_transformers_generates_vlm_greedy_tokens(tmp_path, tokenizer, tower):
    model = tiny_vlm(tokenizer, TOWERS[tower])
    save_llava_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    assert_same_greedy_tokens(tmp_path / "hf", Captioner(model, tokenizer), scenes(2))


def write_checkpoint(path, model, tokenizer_file) -> None:
    """What `vlm export` reads from a `vlm fit` checkpoint: the config, the weights, the tokenizer."""
    torch.save({"hyper_parameters": {"config": model.config.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "VLMDataModule": {"tokenizer": str(tokenizer_file)}}, path)


def test_cli_exports_and_refuses_in_one_line(tmp_path, tokenizer, capsys):
    tokenizer.save(tmp_path / "tokenizer.json")
    model = tiny_vlm(tokenizer, TOWERS["open_clip"])
    write_checkpoint(tmp_path / "ok.ckpt", model, tmp_path / "tokenizer.json")
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "ok.ckpt"), "--out", str(out), "--format", "transformers"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "processor_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert main(["export", "--checkpoint", str(tmp_path / "ok.ckpt"), "--out", str(out), "--format", "transformers"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    timm = VisionConfig(name="timm", model="resnet10t", image_size=32, feature_layer=-1)
    for name, vision, fusion, expected in (
            ("timm", timm, "llava", "cannot write a timm tower (TimmEncoder resnet10t)"),
            ("flamingo", TOWERS["siglip"], "flamingo", "cannot write the flamingo fusion")):
        write_checkpoint(tmp_path / f"{name}.ckpt", tiny_vlm(tokenizer, vision, fusion=fusion), tmp_path / "tokenizer.json")
        args = ["export", "--checkpoint", str(tmp_path / f"{name}.ckpt"), "--out", str(tmp_path / name), "--format",
                "transformers"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "supported: the llava fusion" in err, err
        assert not (tmp_path / name).exists()


def test_unsupported_projector_and_text_are_refused(tokenizer, tmp_path):
    model = tiny_vlm(tokenizer, TOWERS["siglip"])
    model.config.fusion = FusionConfig("llava", {"projector": "linear"})
    model.fusion.options = dataclasses.replace(model.fusion.options, projector="linear")
    with pytest.raises(UserError, match="the linear projector"):
        save_llava_hf(model, tmp_path / "out", tokenizer=tokenizer)


def test_lora_adapters_are_merged_into_the_export(tmp_path, tokenizer):
    from vlm.adapters import lora_modules, wrap_linears
    from vlm.model import ModelInput

    model = tiny_vlm(tokenizer, TOWERS["clip-default"])
    wrap_linears(model, ["text.layers.0.attention.wq", "fusion.projector.0", "vision.vision_model.encoder.layers.0.mlp.fc1"],
                 rank=2, alpha=4)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(std=0.5)  # a trained adapter: not the identity
    save_llava_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    assert lora_modules(model)  # the model itself keeps its adapters
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    per_image = model.tokens_per_image
    ids = [tokenizer.bos_id, *[tokenizer.image_id] * per_image, *tokenizer.encode("What color is the circle?")]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ModelInput(torch.tensor([ids]), None, pixels, torch.tensor([0]))).logits
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_existing_targets_follow_the_export_overwrite_rules(tokenizer, tmp_path):
    model = tiny_vlm(tokenizer, TOWERS["siglip"])
    save_llava_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_llava_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    save_llava_hf(model, tmp_path / "hf", tokenizer=tokenizer, overwrite=True)  # a llava-hf directory is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a llava-hf directory"):
        save_llava_hf(model, tmp_path / "notes", tokenizer=tokenizer, overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
