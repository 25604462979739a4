"""The ``llava-hf`` layout (``transformers.LlavaForConditionalGeneration``, read by vLLM) in and out.

    D/config.json              model_type "llava": text_config (Llama), vision_config (CLIP/SigLIP),
                               image_token_index, vision_feature_layer, vision_feature_select_strategy
    D/model.safetensors        language_model.model.* / language_model.lm_head.weight (the Llama),
                               vision_tower.vision_model.* (the tower), multi_modal_projector.linear_{1,2}.*
    D/generation_config.json   bos / eos (<|eot_id|>, <|end_of_text|>) / pad ids; suppress_tokens
    D/tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
    D/preprocessor_config.json CLIPImageProcessor or SiglipImageProcessor
    D/processor_config.json    LlavaProcessor: image token, patch size, feature selection strategy

Import (``load_llava_hf``, used by ``vlm.load_model`` and so by ``model.init_checkpoint``) reads the
published layout above and the ones later transformers versions write (``model.language_model.*``,
``lm_head.weight``, ``vision_tower.*`` without ``vision_model.``); keys a ``config.json`` leaves out
take transformers' defaults. The model becomes vlm's LLaVA fusion (``mlp2x_gelu`` projector) on an
``hf_vit`` tower. Export (``save_llava_hf``, ``vlm export --format transformers``) writes the
published layout from an ``hf_vit`` or open_clip ViT tower; anything else is refused in one line.
``python -m vlm.checkpoints.llava_hf DIR`` writes the ``vlm fit`` recipe that starts from DIR
(``recipe``; ``--tokenizer-out`` converts a LLaVA-1.5 tokenizer, ``vlm.checkpoints.llava_tokenizer``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlm.checkpoints.common import _read_json, check_replaceable, load_state_exact
from vlm.checkpoints.hf import config_from_hf, config_to_hf, hf_to_ours, ours_to_hf
from vlm.checkpoints.llava_tokenizer import check_tokenizer_file, vlm_tokenizer
from vlm.adapters import lora_modules, merge_lora
from vlm.errors import UserError
from vlm.fusion import FusionConfig, build_fusion
from vlm.fusion.llava import LlavaFusion
from vlm.model import VisionLanguageModel, VLMConfig
from vlm.text.llama import Llama
from vlm.text.tokenizer import BOS, EOT, IMAGE, Tokenizer
from vlm.vision import VisionConfig, build_vision_encoder
from vlm.vision.checkpoint import load_state_dict_checked
from vlm.vision.hf_vit import (DEFAULTS, MODEL_TYPES, HFVisionEncoder, from_hf_feature_layer, hf_vision_state,
                               processor_preprocess, to_hf_feature_layer)
from vlm.vision.open_clip import OpenClipEncoder
from vlm.vision.open_clip_hf import open_clip_as_hf_clip, resize_mode

# transformers' defaults for what a llava config.json may leave out (LlavaConfig, LlamaConfig)
LLAVA_DEFAULTS = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default", "multimodal_projector_bias": True}
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "vocab_size": 32000, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
LLAVA_VISION_DEFAULTS = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                         "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}
# (prefix in the file, part, prefix within that part): the published layout, then transformers >= 4.52's
_PREFIXES = (("language_model.model.", "text", "model."), ("language_model.lm_head.", "text", "lm_head."),
             ("model.language_model.", "text", "model."), ("lm_head.", "text", "lm_head."),
             ("model.vision_tower.", "vision", ""), ("vision_tower.", "vision", ""),
             ("model.multi_modal_projector.", "fusion", ""), ("multi_modal_projector.", "fusion", ""))
_PROJECTOR = {"linear_1": "projector.0", "linear_2": "projector.2"}
SUPPORTED = ("supported: the llava fusion with the mlp2x_gelu projector on an hf_vit (CLIP/SigLIP) tower or an "
             "open_clip ViT tower")


def is_llava_hf(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose config.json is a LLaVA (``model_type`` "llava") config."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "llava"


def llava_config(path: str | Path) -> VLMConfig:
    """The VLMConfig of a llava-hf directory (an ``hf_vit`` tower, the llava fusion)."""
    path = Path(path)
    source = str(path / "config.json")
    hf = {**LLAVA_DEFAULTS, **_read_json(path / "config.json")}
    if hf["projector_hidden_act"] != "gelu" or not hf["multimodal_projector_bias"]:
        raise UserError(f"{source}: a projector with {hf['projector_hidden_act']!r} and bias "
                        f"{hf['multimodal_projector_bias']} is not vlm's mlp2x_gelu (gelu, with biases)")
    text = config_from_hf({**LLAMA_DEFAULTS, **(hf.get("text_config") or {})}, source=f"{source} text_config")
    vision_hf = hf.get("vision_config") or LLAVA_VISION_DEFAULTS
    family = MODEL_TYPES.get(vision_hf.get("model_type", "clip_vision_model"))
    if family is None:
        raise UserError(f"{source}: vision_config model_type {vision_hf.get('model_type')!r} is not supported; "
                        f"vlm reads {sorted(MODEL_TYPES)}")
    strategy = hf["vision_feature_select_strategy"]
    if strategy not in ("default", "full") or (family == "siglip" and strategy == "default"):
        raise UserError(f"{source}: vision_feature_select_strategy {strategy!r} with a {family} tower is not supported "
                        "('default' drops CLIP's class token; SigLIP has none, use 'full')")
    settings = {key: vision_hf[key] for key in DEFAULTS[family] if key in vision_hf}
    preprocess = processor_preprocess(path / "preprocessor_config.json")
    vision = VisionConfig(name="hf_vit", model=family, model_kwargs={**settings, "preprocess": preprocess},
                          feature_layer=from_hf_feature_layer(hf["vision_feature_layer"], source=source),
                          keep_prefix_tokens=strategy == "full")
    return VLMConfig(text=text, vision=vision, fusion=FusionConfig("llava", {"projector": "mlp2x_gelu"}),
                     image_token_id=hf["image_token_index"])


def load_llava_hf(path: str | Path, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """A llava-hf directory as a VisionLanguageModel in eval mode (``dtype=None``: the file's)."""
    path = Path(path)
    config = llava_config(path)
    parts = split_llava_state(_read_weights(path), source=str(path))
    with torch.device("meta"):
        text = Llama(config.text)
    load_state_exact(text, parts["text"], source=f"{path} (language_model)")
    vision = build_vision_encoder(config.vision)
    fusion = build_fusion(config.fusion, text=config.text, vision_dim=vision.dim, vision_tokens=vision.num_tokens,
                          image_token_id=config.image_token_id)
    file_dtype = next(iter(parts["text"].values())).dtype
    for module, name in ((vision, "vision"), (fusion, "fusion")):
        module.to(dtype=dtype or file_dtype)
        load_state_dict_checked(module, parts[name], source=f"{path} ({name})")
    model = VisionLanguageModel(config, text=text, vision=vision, fusion=fusion)
    return model.to(device=device, dtype=dtype).eval()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json (llava-hf weights)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name), device="cpu"))
    return state


def split_llava_state(state: dict[str, torch.Tensor], *, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """A llava-hf state dict -> vlm's ``{"text", "vision", "fusion"}`` state dicts, under vlm's names."""
    parts: dict[str, dict[str, torch.Tensor]] = {"text": {}, "vision": {}, "fusion": {}}
    for key, tensor in state.items():
        match = next(((p, part, inner) for p, part, inner in _PREFIXES if key.startswith(p)), None)
        if match is None:
            raise UserError(f"{source}: tensor {key} belongs to no part of a LLaVA model (language_model, vision_tower, "
                            "multi_modal_projector)")
        prefix, part, inner = match
        parts[part][inner + key[len(prefix):]] = tensor
    text = {k: v for k, v in parts["text"].items() if not k.endswith("rotary_emb.inv_freq")}
    fusion = {}
    for key, tensor in parts["fusion"].items():
        layer, _, kind = key.partition(".")
        if layer not in _PROJECTOR:
            raise UserError(f"{source}: projector tensor {key} is not linear_1 / linear_2 of an mlp2x_gelu projector")
        fusion[f"{_PROJECTOR[layer]}.{kind}"] = tensor
    return {"text": {hf_to_ours(k): v for k, v in text.items()}, "vision": hf_vision_state(parts["vision"]),
            "fusion": fusion}


# --- export -------------------------------------------------------------------------------------

CHAT_TEMPLATE = (  # vlm.text.chat.ChatTemplate's layout, for transformers' apply_chat_template
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@dataclasses.dataclass
class ExportedTower:
    """A vision tower in Hugging Face terms: config, ``vision_model.*`` tensors, how LLaVA reads it."""

    family: str
    settings: dict[str, Any]
    state: dict[str, torch.Tensor]
    preprocess: dict[str, Any]
    feature_layer: int  # Hugging Face's vision_feature_layer
    strategy: str  # vision_feature_select_strategy


def save_llava_hf(model: VisionLanguageModel, path: str | Path, *, tokenizer: Tokenizer,
                  overwrite: bool = False) -> None:
    """Write ``model`` (LoRA adapters merged) and ``tokenizer`` as a llava-hf directory (module docstring)
    that ``transformers.LlavaForConditionalGeneration`` and ``AutoProcessor`` load offline."""
    from vlm.export import _apply_umask, _move_into_place, check_tokenizer

    check_tokenizer(tokenizer, model.config, source="tokenizer")
    if lora_modules(model):
        model = merge_lora(copy.deepcopy(model))
    tower = export_tower(model)
    path = Path(path)
    replace = check_replaceable(path, overwrite=overwrite, ours=is_llava_hf,
                                what="a llava-hf directory (no LLaVA config.json)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        save_file(llava_state(model, tower), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", llava_hf_config(model, tower))
        _write_tokenizer(tmp, tokenizer, model, tower)
        _apply_umask(tmp)
        _move_into_place(tmp, path, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_tower(model: VisionLanguageModel) -> ExportedTower:
    """The model's tower in Hugging Face terms; UserError naming what is supported otherwise."""
    fusion, encoder = model.fusion, model.vision
    if not isinstance(fusion, LlavaFusion) or fusion.options.projector != "mlp2x_gelu":
        what = f"the {model.config.fusion.name} fusion" if not isinstance(fusion, LlavaFusion) else \
            f"the {fusion.options.projector} projector"
        raise UserError(f"--format transformers cannot write {what}: LlavaForConditionalGeneration has none; {SUPPORTED}")
    if model.config.text.moe is not None:
        raise UserError(f"--format transformers cannot write a Mixture-of-Experts text backbone (a llava-hf "
                        f"language model is a dense Llama); {SUPPORTED}")
    keep = encoder.keep_prefix_tokens
    if isinstance(encoder, HFVisionEncoder):
        strategy = "full" if keep or encoder.family == "siglip" else "default"
        return ExportedTower(encoder.family, dict(encoder.settings), dict(encoder.state_dict()),
                             dict(encoder.preprocess), to_hf_feature_layer(encoder.feature_layer), strategy)
    if isinstance(encoder, OpenClipEncoder):
        settings, state = open_clip_as_hf_clip(encoder)
        preprocess = {"mean": encoder.transform.mean, "std": encoder.transform.std,
                      "resize": resize_mode(encoder.transform)}
        return ExportedTower("clip", settings, state, preprocess, -1, "full" if keep else "default")
    raise UserError(f"--format transformers cannot write a {model.config.vision.name} tower "
                    f"({type(encoder).__name__} {model.config.vision.model}); {SUPPORTED}")


def llava_state(model: VisionLanguageModel, tower: ExportedTower) -> dict[str, torch.Tensor]:
    """The published llava-hf tensor names and values (contiguous CPU copies)."""
    text = {f"language_model.{ours_to_hf(k)}": v for k, v in model.text.state_dict().items()}
    if model.config.text.tie_embeddings:
        text.pop("language_model.lm_head.weight", None)
    fusion = {f"multi_modal_projector.{hf}.{kind}": model.fusion.state_dict()[f"{ours}.{kind}"]
              for hf, ours in _PROJECTOR.items() for kind in ("weight", "bias")}
    vision = {f"vision_tower.{k}": v for k, v in tower.state.items()}
    return {k: v.detach().cpu().contiguous().clone() for k, v in {**text, **vision, **fusion}.items()}


def llava_hf_config(model: VisionLanguageModel, tower: ExportedTower) -> dict[str, Any]:
    dtype = model.text.tok_embeddings.weight.dtype
    text = {k: v for k, v in config_to_hf(model.config.text, dtype=dtype).items() if k != "architectures"}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
            "vision_config": {"model_type": f"{tower.family}_vision_model", **tower.settings},
            "image_token_index": model.config.image_token_id, "image_seq_length": model.vision.num_tokens,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "vision_feature_layer": tower.feature_layer, "vision_feature_select_strategy": tower.strategy,
            "tie_word_embeddings": model.config.text.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch.")}


def _write_tokenizer(folder: Path, tokenizer: Tokenizer, model: VisionLanguageModel, tower: ExportedTower) -> None:
    """Tokenizer, chat template, generation defaults, image processor and LlavaProcessor settings."""
    names = {index: token for token, index in tokenizer.special_tokens.items()}
    specials = {"bos_token": BOS, "eos_token": EOT, "pad_token": names[tokenizer.pad_id]}
    tokenizer.save(folder / "tokenizer.json")
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials, "chat_template": CHAT_TEMPLATE,
        "model_max_length": model.config.text.max_seq_len, "clean_up_tokenization_spaces": False,
        "processor_class": "LlavaProcessor"})
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    unused = range(tokenizer.vocab_size, model.config.text.vocab_size)  # rows no token maps to: never generated
    _write_json(folder / "generation_config.json", {
        "bos_token_id": tokenizer.bos_id, "eos_token_id": [tokenizer.eot_id, tokenizer.eos_id],
        "pad_token_id": tokenizer.pad_id, "suppress_tokens": [model.config.image_token_id, *unused]})
    _write_json(folder / "preprocessor_config.json", image_processor_config(tower))
    _write_json(folder / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": IMAGE, "patch_size": tower.settings["patch_size"],
        "vision_feature_select_strategy": tower.strategy, "num_additional_image_tokens": int(tower.family == "clip")})


def image_processor_config(tower: ExportedTower) -> dict[str, Any]:
    """CLIPImageProcessor (resize the short side, centre crop) or SiglipImageProcessor (squash)."""
    size, (mean, std) = tower.settings["image_size"], (list(tower.preprocess["mean"]), list(tower.preprocess["std"]))
    common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": mean, "image_std": std, "do_convert_rgb": True}  # resample 3: bicubic
    if tower.preprocess["resize"] == "crop":
        return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": size},
                "do_center_crop": True, "crop_size": {"height": size, "width": size}}
    return {"image_processor_type": "SiglipImageProcessor", **common, "size": {"height": size, "width": size}}


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")



def recipe(path: str | Path, *, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """The ``vlm fit`` overrides that start from a llava-hf directory: its model config, the directory
    as ``model.init_checkpoint`` and ``tokenizer`` (default: the directory's own tokenizer.json) as
    ``data.tokenizer`` (printed as JSON, which YAML reads, by ``main``)."""
    config = json.loads(json.dumps(llava_config(path).to_dict()))  # tuples -> lists
    tokenizer = Path(tokenizer or Path(path) / "tokenizer.json").resolve()
    return {"model": {"config": config, "init_checkpoint": str(Path(path).resolve())},
            "data": {"tokenizer": str(tokenizer)}}


def main(argv: list[str] | None = None) -> int:
    """``python -m vlm.checkpoints.llava_hf DIR [--out recipe.yaml]``: ``recipe(DIR)`` as JSON (stdout by default)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m vlm.checkpoints.llava_hf", description=main.__doc__)
    parser.add_argument("directory", help="a llava-hf directory (transformers' LlavaForConditionalGeneration)")
    parser.add_argument("--out", default=None, help="write the recipe to this file instead of printing it")
    parser.add_argument("--tokenizer-out", default=None, metavar="FILE",
                        help="write a tokenizer.json vlm reads, converted from the directory's (vlm_tokenizer), and "
                             "train with it; needed when the directory's tokenizer lacks vlm's chat tokens (LLaVA-1.5)")
    args = parser.parse_args(argv)
    try:
        if not is_llava_hf(args.directory):
            raise UserError(f"{args.directory} is not a llava-hf directory (no config.json with model_type 'llava')")
        config = llava_config(args.directory)
        if args.tokenizer_out:
            vlm_tokenizer(args.directory, args.tokenizer_out, embedding_rows=config.text.vocab_size)
        else:
            check_tokenizer_file(Path(args.directory) / "tokenizer.json", image_id=config.image_token_id)
        text = json.dumps(recipe(args.directory, tokenizer=args.tokenizer_out), indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
    except (UserError, ValueError) as error:
        print(f"python -m vlm.checkpoints.llava_hf: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
