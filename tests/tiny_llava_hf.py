"""Tiny random transformers LLaVA models saved by transformers, for the interoperability tests."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.text.tokenizer import Tokenizer

EXTRA_ROWS = 3  # embedding rows past the tokenizer's ids, as padded vocabularies have
PROMPTS = [None, "What color is the circle?", "Describe the image in one sentence, please."]


def perturb_norms_and_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """Random non-trivial norms and biases (transformers initialises them to 1 and 0), so a wrong
    wiring of either shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def save_tiny_llava(folder: Path, tokenizer: Tokenizer, *, family: str = "clip", strategy: str = "default",
                    layer: int = -2, tie: bool = False):
    """A random transformers LlavaForConditionalGeneration saved by transformers, with the tokenizer."""
    import transformers

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8)
    vision_config = (transformers.CLIPVisionConfig if family == "clip" else transformers.SiglipVisionConfig)(**vision)
    text_config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                           vocab_size=tokenizer.vocab_size + EXTRA_ROWS, tie_word_embeddings=tie,
                                           max_position_embeddings=256)
    tokens = 16 + (family == "clip" and strategy == "full")
    config = transformers.LlavaConfig(vision_config=vision_config, text_config=text_config,
                                      image_token_index=tokenizer.image_id, image_seq_length=tokens,
                                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                                      tie_word_embeddings=tie)
    model = transformers.LlavaForConditionalGeneration(config)
    perturb_norms_and_biases(model)
    model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return model.eval()


def assert_same_greedy_tokens(folder, captioner, images, *, max_new_tokens: int = 12) -> None:
    """For every image x prompt: transformers' processor gives vlm's prompt ids and pixels, and greedy
    generate its tokens (stopping at the exported eos ids, and without stopping)."""
    import transformers

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    tokenizer = captioner.tokenizer
    for image in images:
        for prompt in PROMPTS:
            content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            inputs = processor(images=image, text=text, return_tensors="pt")
            ids = captioner.prompt_ids(prompt)
            per_image = captioner.model.tokens_per_image
            expanded = [t for token in ids for t in [token] * (per_image if token == tokenizer.image_id else 1)]
            assert inputs["input_ids"][0].tolist() == expanded
            torch.testing.assert_close(inputs["pixel_values"][0], captioner.transform(image), atol=1e-5, rtol=0)
            for stops in (captioner.stop_tokens, ()):  # as exported (stop at <|eot_id|>), and always the full length
                ours = captioner.model.generate([[captioner.transform(image)]], [ids], max_new_tokens=max_new_tokens,
                                                stop_tokens=stops, pad_id=tokenizer.pad_id,
                                                vocab_size=tokenizer.vocab_size)[0]
                extra = {} if stops else {"eos_token_id": None}
                with torch.no_grad():
                    theirs = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
                theirs = theirs[0, len(expanded):].tolist()
                assert theirs[:len(ours)] == ours and theirs[len(ours):] in ([], [tokenizer.eot_id], [tokenizer.eos_id])
            assert len(ours) == max_new_tokens
