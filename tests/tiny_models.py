"""Tiny vision-language models for the fusion and model tests (built offline, in milliseconds)."""

import dataclasses

import torch

from vlm.fusion import FusionConfig
from vlm.model import ModelInput, VLMConfig, build_model
from vlm.text.llama import LlamaConfig
from vlm.vision import VisionConfig

IMAGE_ID = 5
VOCAB = 64
TINY_FLAMINGO = dict(num_latents=4, resampler_depth=1, resampler_heads=2, resampler_head_dim=16,
                     cross_attn_heads=2, cross_attn_head_dim=16, ff_mult=2)


def tiny_model(fusion: str = "llava", seed: int = 0, **options):
    torch.manual_seed(seed)
    if fusion == "flamingo":
        options = {**TINY_FLAMINGO, **options}
    config = VLMConfig(
        text=LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=128),
        vision=VisionConfig(model="vit_tiny_patch16_224", model_kwargs=dict(img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
        fusion=FusionConfig(fusion, options),
        image_token_id=IMAGE_ID,
    )
    return build_model(config).eval()


def tiny_model_for(tokenizer, fusion: str = "llava", seed: int = 0):
    """The tiny model with its embedding table sized for `tokenizer` (whose <|image|> is IMAGE_ID)."""
    config = tiny_model(fusion).config
    config.text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size)
    assert config.image_token_id == tokenizer.image_id
    torch.manual_seed(seed)
    return build_model(config).eval()


def open_gates(model, value: float = 1.0) -> None:
    """Flamingo gates start at 0 (the text model); tests of the image path open them."""
    with torch.no_grad():
        for name, p in model.fusion.named_parameters():
            if name.endswith("_gate"):
                p.fill_(value)


def batch_from(model, rows, images=None, labels=False) -> ModelInput:
    """rows: token lists with one IMAGE_ID per image; images: per row, tensors [3, 16, 16]."""
    images = images or [[] for _ in rows]
    per = model.tokens_per_image
    expanded = [[t for tok in row for t in ([tok] * (per if tok == IMAGE_ID else 1))] for row in rows]
    width = max(map(len, expanded))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(expanded):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    flat = [im for row in images for im in row]
    owners = torch.tensor([r for r, row in enumerate(images) for _ in row], dtype=torch.long)
    batch = ModelInput(ids, mask, torch.stack(flat) if flat else None, owners if flat else None)
    if labels:
        batch.labels = torch.where((ids == IMAGE_ID) | (mask == 0), -100, ids)
    return batch


def images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 16, 16, generator=g) for _ in range(n)]
