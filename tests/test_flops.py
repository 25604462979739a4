"""The MFU FLOP counter equals a hand count of every matrix product of a tiny model, and what
torch's FlopCounterMode counts when the model runs."""

import dataclasses

import torch
from tiny_models import IMAGE_ID, batch_from, images, open_gates, tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlm.flops import StepShape, model_flops
from vlm.text.moe import MoEConfig

# tests/tiny_models.py: text dim 64, 4 layers, 4 heads of 16, 2 kv heads, SwiGLU 128, vocabulary 64;
# tower: 16x16 images, patches of 8 (4 patches + CLS = 5 tokens), width 32, MLP 128, 2 heads,
# depth 2 pruned after block 1 (feature layer -2): one block runs.
VISION_PER_IMAGE = (2 * 4 * (3 * 8 * 8) * 32  # patch embedding: a conv over 4 patches
                    + 2 * 5 * 32 * 96 + 2 * 5 * 32 * 32  # qkv and output projections
                    + 2 * 2 * 5 * 5 * 32  # scores and weighted sum: 5 x 5 keys, 2 heads x 16
                    + 2 * 2 * 5 * 32 * 128)  # MLP up and down


def text_by_hand(rows: int, seq: int) -> int:
    tokens = rows * seq
    per_layer = (2 * tokens * 64 * (64 + 2 * 32) + 2 * tokens * 64 * 64  # q, k, v (2 kv heads x 16), o
                 + rows * 2 * 2 * seq * seq * 64  # attention over the full T x T square, 4 heads x 16
                 + 3 * 2 * tokens * 64 * 128)  # SwiGLU
    return 4 * per_layer + 2 * tokens * 64 * 64  # + the output head


def counted(model, batch) -> float:
    """FlopCounterMode over the forward (logits on every position), attention as SDPA's math
    decomposition (the counter has no formula for the CPU flash kernel)."""
    model.requires_grad_(False)  # the counter's module tracker fails on views of parameters made under no_grad
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)
    return float(counter.get_total_flops())


def test_llava_count_equals_the_hand_count_and_flop_counter_mode():
    model = tiny_model("llava")
    batch = batch_from(model, [[1, IMAGE_ID, 3, 4], [2, IMAGE_ID, 7, IMAGE_ID]], [images(1), images(2, 1)])
    rows, seq = batch.input_ids.shape
    flops = model_flops(model, StepShape(rows, seq, images=3, images_per_row=2))
    projector = 3 * 4 * (2 * 32 * 64 + 2 * 64 * 64)  # 3 images x 4 tokens, mlp2x_gelu
    assert flops.parts["vision"] == 3 * VISION_PER_IMAGE
    assert flops.forward == text_by_hand(rows, seq) + 3 * VISION_PER_IMAGE + projector
    assert flops.forward == counted(model, batch)
    assert flops.train == 3 * flops.forward


def test_flamingo_count_equals_the_hand_count_and_flop_counter_mode():
    model = tiny_model("flamingo")
    open_gates(model)
    batch = batch_from(model, [[1, IMAGE_ID, 3, 4, 6], [2, IMAGE_ID, 7, IMAGE_ID, 8]], [images(1), images(2, 1)])
    rows, seq = batch.input_ids.shape
    flops = model_flops(model, StepShape(rows, seq, images=3, images_per_row=2))
    # resampler (4 latents over 4 features + 4 latents, 2 heads x 16 = 32, ff x2), depth 1, per image
    resampler = (2 * 4 * 32 * 32 + 2 * 8 * 32 * 64 + 2 * 2 * 4 * 8 * 32 + 2 * 4 * 32 * 32 + 2 * 2 * 4 * 32 * 64)
    keys = 2 * 4  # two images' latents per row
    block = (2 * rows * seq * 64 * 32 + 2 * rows * keys * 32 * 64 + rows * 2 * 2 * seq * keys * 32
             + 2 * rows * seq * 32 * 64 + 2 * 2 * rows * seq * 64 * 128)
    assert flops.forward == text_by_hand(rows, seq) + 3 * (VISION_PER_IMAGE + resampler) + 4 * block
    assert flops.forward == counted(model, batch)


def test_head_positions_tied_head_and_moe():
    model = tiny_model("llava")
    shape = StepShape(2, 8)
    full = model_flops(model, shape)
    assert full.parts["text/head"] == 2 * 16 * 64 * 64
    assert model_flops(model, dataclasses.replace(shape, head_positions=5)).parts["text/head"] == 2 * 5 * 64 * 64
    tied = tiny_model("llava").config
    tied.text = dataclasses.replace(tied.text, tie_embeddings=True)
    from vlm.model import build_model

    assert model_flops(build_model(tied), shape).forward == full.forward  # the tied head is still a product
    moe = tiny_model("llava").config
    moe.text = dataclasses.replace(moe.text, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=32))
    moe_model = build_model(moe).eval()
    # Model FLOPs count what each token's experts compute, not the dispatch's padding to capacity.
    by_hand = 4 * (2 * 8 * 64 * 4 + 2 * 3 * 2 * 8 * 64 * 32)  # router + 2 of 4 experts per token
    dense_ffn = 4 * 3 * 2 * 8 * 64 * 128
    assert model_flops(moe_model, StepShape(1, 8)).forward == text_by_hand(1, 8) - dense_ffn + by_hand
