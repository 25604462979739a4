"""Save a VisionLanguageModel to a directory and load it back, without Lightning or pickle.

    D/config.json          {"format": "vlm", "format_version": 1, "config": VLMConfig.to_dict()}
    D/text/                the Llama backbone in Hugging Face layout (transformers.LlamaForCausalLM loads it)
    D/vision.safetensors   the vision encoder's state_dict
    D/fusion.safetensors   the fusion's state_dict
    D/tokenizer.json       when a tokenizer was given

A model with LoRA adapters (`vlm.adapters`) is saved merged (`merge_lora=True`: plain linears
holding W + s B A), or unmerged: the parts above hold the base (adapted linears' frozen weights,
dequantised from NF4), and

    D/adapter/             the text backbone's adapters in PEFT's layout; `base_model_name_or_path`
                           is D/text, so `peft.PeftModel.from_pretrained(LlamaForCausalLM(D/text), D/adapter)`
    D/adapters.safetensors adapters of the vision tower and fusion (vlm names; rank, alpha, dropout
                           and DoRA per module in its metadata)

`load_model` puts unmerged adapters back on (`vlm.adapters.merge_lora` merges them).

A directory is written under a temporary name next to its target and renamed when complete, so a
crash never leaves a half-written model under the final name. Its folders and files get the modes
the umask gives (0755 and 0644 under umask 0022), not those of the temporary folder (0700) or of
safetensors (0600). Tensors that alias one another
(tied weights) are stored once and listed in the file's metadata; everything read is JSON or
safetensors, so loading never unpickles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlm.adapters import LoRALinear, adapter_state_dict, load_peft_adapter, lora_modules, save_peft_adapter, wrap_linears
from vlm.adapters.nf4 import dequantize, is_nf4
from vlm.checkpoints import load_llama, save_llama_hf
from vlm.checkpoints.common import check_replaceable
from vlm.checkpoints.llava_hf import is_llava_hf, llava_config, load_llava_hf
from vlm.fusion import build_fusion
from vlm.model import VisionLanguageModel, VLMConfig
from vlm.text.tokenizer import Tokenizer
from vlm.vision import build_vision_encoder
from vlm.vision.checkpoint import load_state_dict_checked

FORMAT = "vlm"
FORMAT_VERSION = 1
CONFIG_FILE, TEXT_DIR, VISION_FILE, FUSION_FILE, TOKENIZER_FILE = (
    "config.json", "text", "vision.safetensors", "fusion.safetensors", "tokenizer.json")
_ALIASES_KEY = "vlm_aliases"  # safetensors metadata: {"dropped name": "stored name"} for tied tensors
ADAPTER_DIR, ADAPTERS_FILE = "adapter", "adapters.safetensors"
_ADAPTERS_KEY = "vlm_lora"  # safetensors metadata: {module name: {"rank", "alpha", "dropout", "use_dora"}}


def save_model(model: VisionLanguageModel, path: str | Path, *, tokenizer: Tokenizer | None = None,
               overwrite: bool = False, merge_lora: bool = True) -> None:
    """Write `model` (and `tokenizer`) as a model directory at `path`; LoRA adapters merged, or
    with `merge_lora=False` beside the base (module docstring). `model` is left as it was.

    An existing non-empty directory is refused unless `overwrite=True`, and even then only if it
    is a model directory (has our config.json): a mistyped path never deletes someone's files.
    """
    path = Path(path)
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config, source="tokenizer")
    replace = _check_target(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(_config_json(model.config))
        with _plain_linears(model, merge=merge_lora):
            save_llama_hf(model.text, tmp / TEXT_DIR)
            save_tensors(model.vision.state_dict(), tmp / VISION_FILE)
            save_tensors(model.fusion.state_dict(), tmp / FUSION_FILE)
        if not merge_lora:
            _save_adapters(model, tmp, text_dir=path.resolve() / TEXT_DIR)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        _apply_umask(tmp)
        _move_into_place(tmp, path, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _plain_linears(model: nn.Module, *, merge: bool) -> Iterator[None]:
    """Every LoRALinear of `model` replaced, for the moment of saving, by a plain linear: its
    merged weight (`merge`), or its base's (dense)."""
    adapted = lora_modules(model)
    try:
        for name, module in adapted.items():
            model.set_submodule(name, module.merged() if merge else _dense_base(module))
        yield
    finally:
        for name, module in adapted.items():
            model.set_submodule(name, module)


def _dense_base(module: LoRALinear) -> nn.Linear:
    if not is_nf4(module.base.weight):
        return module.base
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(dequantize(module.base.weight), requires_grad=False)
    linear.bias = module.bias
    return linear


def _save_adapters(model: nn.Module, folder: Path, *, text_dir: Path) -> None:
    """The text adapters in PEFT's layout, the others in ADAPTERS_FILE (module docstring)."""
    adapted = lora_modules(model)
    if not adapted:
        raise ValueError("merge_lora=False (--no-merge-lora) needs a model with LoRA adapters; this one has none")
    if any(name.startswith("text.") for name in adapted):
        save_peft_adapter(model, folder / ADAPTER_DIR, base_model_name_or_path=str(text_dir), ignore_non_text=True)
    others = {name: m for name, m in adapted.items() if not name.startswith("text.")}
    if others:
        settings = {name: {"rank": m.rank, "alpha": m.rank * m.scaling, "use_dora": m.use_dora,
                           "dropout": m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0}
                    for name, m in others.items()}
        tensors = {k: v.cpu().contiguous() for k, v in adapter_state_dict(model).items() if not k.startswith("text.")}
        save_file(tensors, str(folder / ADAPTERS_FILE), metadata={"format": "pt", _ADAPTERS_KEY: json.dumps(settings)})


def _load_adapters(model: nn.Module, folder: Path) -> None:
    """Put the adapters an unmerged export saved back on `model` (nothing when there are none)."""
    if (folder / ADAPTER_DIR).is_dir():
        load_peft_adapter(model, folder / ADAPTER_DIR)
    file = folder / ADAPTERS_FILE
    if not file.is_file():
        return
    tensors = load_tensors(file)
    with safe_open(str(file), framework="pt") as handle:
        settings = json.loads((handle.metadata() or {}).get(_ADAPTERS_KEY, "{}"))
    for name, options in settings.items():
        wrap_linears(model, [name], **options)
    expected = {k: v for k, v in adapter_state_dict(model).items() if k.split(".", 1)[0] != "text"}
    problems = sorted(set(expected) ^ set(tensors))
    if problems:
        raise ValueError(f"{file}: adapter tensors do not match its settings: {problems[:3]}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (threads may be creating
    files meanwhile), else by the set-and-restore idiom."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give `root` and everything in it the modes a plain mkdir / open would: the temporary
    folder is 0700 and safetensors writes 0600 files, whatever the umask."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, folders, files in os.walk(root):
        for name in folders:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _config_json(config: VLMConfig) -> str:
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict()}
    try:
        return json.dumps(document, indent=2) + "\n"
    except TypeError as error:  # e.g. a non-JSON value in VisionConfig.model_kwargs
        raise ValueError(f"the model config cannot be written as JSON: {error}") from error


def _check_target(path: Path, *, overwrite: bool) -> bool:
    """Whether an existing directory at `path` must be replaced; raises if it may not be."""
    return check_replaceable(path, overwrite=overwrite, what=f"a vlm model directory (no {CONFIG_FILE} and {TEXT_DIR}/)",
                             ours=lambda found: (found / CONFIG_FILE).is_file() and (found / TEXT_DIR).is_dir())


def _move_into_place(tmp: Path, path: Path, *, replace: bool) -> None:
    if not replace:
        tmp.rename(path)
        return
    # Park the old directory in a fresh temporary one, so the final name is vacant for a moment only.
    parking = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
    path.rename(parking / "old")
    try:
        tmp.rename(path)
    except BaseException:
        (parking / "old").rename(path)
        parking.rmdir()
        raise
    shutil.rmtree(parking)


def save_tensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors: aliases of one tensor stored once, views made contiguous."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}  # the exact view (storage, offset, shape, stride, dtype) -> stored name
    storages: set[tuple] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        owned = tensor.cpu().contiguous()
        # safetensors refuses tensors that share memory: a second view into a storage, or a slice of
        # a bigger one, is copied so every stored tensor owns exactly its bytes
        if owned.untyped_storage().nbytes() != owned.nbytes or (tensor.numel() and storage in storages):
            owned = owned.clone()
        storages.add(storage)
        stored[name] = owned
    save_file(stored, str(path), metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)})


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by `save_tensors`, restoring aliased names; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    for name, target in aliases.items():
        if target not in state:
            raise ValueError(f"{path}: tensor {name} is an alias of {target}, which the file does not hold")
        state[name] = state[target]
    return state


def load_model(path: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Rebuild the model saved at `path`, in eval mode (with the adapters of an unmerged export).

    `dtype=None` keeps each part in the dtype it was saved in. Every missing, unexpected or
    mis-shaped tensor is an error that names it (with both shapes). A llava-hf directory
    (`transformers.LlavaForConditionalGeneration`) loads too (`vlm.checkpoints.llava_hf`).
    """
    path = Path(path)
    if is_llava_hf(path):
        return load_llava_hf(path, device=device, dtype=dtype)
    config = read_config(path)
    text = load_llama(path / TEXT_DIR, dtype=dtype, device=device)
    _check_text_config(text.config, config, path / TEXT_DIR)
    vision = build_vision_encoder(config.vision)
    fusion = build_fusion(config.fusion, text=config.text, vision_dim=vision.dim, vision_tokens=vision.num_tokens,
                          image_token_id=config.image_token_id)
    for module, file in ((vision, VISION_FILE), (fusion, FUSION_FILE)):
        state = load_tensors(path / file)
        module.to(device=device, dtype=dtype or _floating_dtype(state) or torch.float32)
        load_state_dict_checked(module, state, source=str(path / file))
    model = VisionLanguageModel(config, text=text, vision=vision, fusion=fusion)
    _load_adapters(model, path)
    return model.eval()


def read_config(path: str | Path) -> VLMConfig:
    """The VLMConfig of a model directory, with the vision tower's weight source cleared: its
    weights come from the directory, never from a checkpoint path or a hub download. A llava-hf
    directory's config is read as `vlm.checkpoints.llava_hf.llava_config` makes it."""
    path = Path(path)
    if is_llava_hf(path):
        return llava_config(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a vlm model directory: {file} does not exist")
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT or "config" not in document:
        raise ValueError(f"{file} is not a vlm model config (expected \"format\": \"{FORMAT}\" and \"config\")")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {document.get('format_version')!r} is not supported "
                         f"(this vlm reads version {FORMAT_VERSION})")
    try:
        config = VLMConfig.from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: invalid model config: {error}") from error
    config.vision = dataclasses.replace(config.vision, checkpoint_path=None, pretrained=False)
    return config


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved with the model at `path`, checked against the model's config."""
    path = Path(path)
    file = path / TOKENIZER_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not file.is_file():
        raise FileNotFoundError(f"model directory {path} has no {TOKENIZER_FILE}; export it again with "
                                "`vlm export --tokenizer tokenizer.json` (save_model(..., tokenizer=...) in Python)")
    tokenizer = Tokenizer.from_file(file, extra_special_tokens=())
    if (path / CONFIG_FILE).is_file():
        check_tokenizer(tokenizer, read_config(path), source=str(file))
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, config: VLMConfig, *, source: str) -> None:
    """The tokenizer's ids must fit the embedding table and agree on `<|image|>`."""
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(f"{source}: vocab size {tokenizer.vocab_size} exceeds the model's {config.text.vocab_size}")
    if tokenizer.image_id != config.image_token_id:
        raise ValueError(f"{source}: <|image|> has id {tokenizer.image_id} but the model uses {config.image_token_id}")


_TRAINING_ONLY = frozenset({"dropout"})  # not in the Hugging Face layout the text backbone is saved in


def _check_text_config(loaded, config: VLMConfig, source: Path) -> None:
    different = [f"{f.name}: {source} has {getattr(loaded, f.name)!r}, config.json has {getattr(config.text, f.name)!r}"
                 for f in dataclasses.fields(loaded)
                 if f.name not in _TRAINING_ONLY and getattr(loaded, f.name) != getattr(config.text, f.name)]
    if different:
        raise ValueError(f"text backbone does not match the model config: {'; '.join(different)}")


def _floating_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    return next((t.dtype for t in state.values() if t.is_floating_point()), None)


