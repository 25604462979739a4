"""Blocks, FSDP1 wiring (in-process: Lightning's FSDPStrategy refuses CPU runs), and activation
checkpointing on one device."""

import pytest
import torch
from tiny_models import batch_from, images, open_gates, tiny_model

from vlm.fusion.flamingo import GatedCrossAttentionBlock, PerceiverResampler
from vlm.stages import set_trainable
from vlm.text.llama import DecoderLayer
from vlm.training.parallel import FSDP1Strategy, apply_activation_checkpointing, block_classes, blocks, vision_blocks


def test_blocks_cover_every_repeated_unit():
    model = tiny_model("flamingo")
    units = blocks(model)
    assert len(vision_blocks(model.vision)) == 1  # depth 2, cut after block -2
    assert sum(isinstance(u, DecoderLayer) for u in units) == 4
    assert sum(isinstance(u, GatedCrossAttentionBlock) for u in units) == 4
    assert sum(isinstance(u, PerceiverResampler) for u in units) == 1
    assert {type(u) for u in units} <= block_classes()


def test_fsdp1_strategy_policies():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = FSDP1Strategy(activation_checkpointing=True)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    model = tiny_model("flamingo")
    wrapped = [m for m in model.modules() if type(m) in policy._module_classes]
    assert len(wrapped) == len(blocks(model))  # the same units as FSDP2 and checkpointing
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert checkpointed._module_classes == policy._module_classes
    assert strategy._state_dict_type == "sharded"
    assert FSDP1Strategy()._activation_checkpointing_kwargs == {}


def _saved_bytes_and_grads(model, batch):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch, return_logits=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sum(saved), grads


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_activation_checkpointing_same_loss_and_grads_less_memory(fusion):
    rows = [[1, 5, 8, 9, 10, 11, 12, 13] * 4, [2, 3, 5, 12, 5, 13, 14] * 4]
    reference = tiny_model(fusion)
    if fusion == "flamingo":
        open_gates(reference, 0.5)
    set_trainable(reference, "full")
    reference.train()
    batch = batch_from(reference, rows, [images(4), images(8, seed=1)], labels=True)
    loss, plain_bytes, grads = _saved_bytes_and_grads(reference, batch)

    checkpointed = tiny_model(fusion)
    checkpointed.load_state_dict(reference.state_dict())
    set_trainable(checkpointed, "full")
    checkpointed.train()
    assert apply_activation_checkpointing(blocks(checkpointed)) == len(blocks(checkpointed))
    loss_ac, ac_bytes, grads_ac = _saved_bytes_and_grads(checkpointed, batch)
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in reference.named_parameters()]
    torch.testing.assert_close(loss_ac, loss, atol=1e-6, rtol=1e-6)
    assert grads_ac.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], atol=1e-6, rtol=1e-5)
    assert ac_bytes < 0.6 * plain_bytes, (ac_bytes, plain_bytes)


def test_fp8_with_tensor_parallelism_is_refused_before_anything_is_sharded():
    from types import SimpleNamespace

    from vlm.errors import UserError
    from vlm.training.fp8 import Float8Precision
    from vlm.training.module import VLMModule

    module = VLMModule(tiny_model("llava").config)
    mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2), "data_parallel": SimpleNamespace(size=lambda: 1)}
    module._device_mesh = mesh
    module._trainer = SimpleNamespace(world_size=2, precision_plugin=Float8Precision(recipe="tensorwise"), precision="32-true")
    with pytest.raises(UserError, match="fp8.*tensor parallelism"):
        module.configure_model()
