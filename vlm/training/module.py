"""The LightningModule: build the model, call it, compute the loss, log. Nothing else lives here."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vlm.adapters import merge_lora
from vlm.errors import UserError
from vlm.eval.metrics import caption_metrics
from vlm.model import VisionLanguageModel, VLMConfig, build_model, is_sharded
from vlm.objectives import PreferenceOutput
from vlm.stages import set_trainable
from vlm.text.moe import moe_statistics, pop_aux_loss, update_expert_biases
from vlm.training.compile import compile_backend, compile_model, compile_statistics
from vlm.training.lora import CHECKPOINT_KEY as LORA_KEY
from vlm.training.lora import LoRARun, LoRASettings, is_lora_checkpoint, lora_settings, model_from_lora_checkpoint
from vlm.training.optim import OptimConfig, build_optimizer
from vlm.training.parallel import (apply_activation_checkpointing, apply_fsdp2, apply_tensor_parallel, blocks,
                                   unsharded_root)
from vlm.training.preference import (CHECKPOINT_KEY, OBJECTIVES, AdapterReference, FrozenReference, PreferenceConfig,
                                     Reference, cache_reference, check_preference_batch, chosen_rows, preference_step,
                                     register_pair_forward)

log = logging.getLogger(__name__)


class VLMModule(L.LightningModule):
    """Trains a VisionLanguageModel.

    Args:
        config: the model (text, vision, fusion).
        stage: `align`, `instruct` or `full` (see `vlm.stages`); `include`/`exclude` refine it.
        text_checkpoint: Llama weights (Hugging Face or Meta directory) for the text backbone.
        init_checkpoint: start from a whole model: a `vlm fit` .ckpt (e.g. stage 1 before stage 2)
            or a directory written by `vlm export`. Loaded after `text_checkpoint`.
        optim: optimizer and schedule.
        max_nonfinite: abort after this many steps with a non-finite loss (each one is skipped).
        activation_checkpointing: recompute each block's activations in backward (any strategy).
        compile: `torch.compile` each block (decoder layer, cross-attention block, resampler, vision
            block; see `vlm.training.compile`): true (inductor), false, or a backend name such as
            `aot_eager`. Works with activation checkpointing, FSDP2 and fp8; the graph and
            recompile counts are logged as train/compile/*.
        caption_samples: validation rows whose captions are generated for the metrics and grid.
        max_new_tokens: generation length for those captions.
        label_smoothing: spread this much of each training target over the whole vocabulary (the
            training loss only; validation reports the plain next-token loss).
        objective: `next_token` (the captions/answers' likelihood; of preference pairs, the chosen
            answers') or `dpo` (preference pairs against a frozen copy of the starting model, or
            with `lora` the policy with its adapters disabled; see `vlm.training.preference`).
        preference: the DPO-family loss settings when `objective` is dpo.
        lora: LoRA / QLoRA adapters (`vlm.adapters.LoRAConfig` fields: rank, alpha, dropout,
            targets, parts, use_dora, quantize_base); they train with whatever the stage trains,
            adapted linears stay frozen, checkpoints hold the trained tensors only (see
            `vlm.training.lora`).
    """

    def __init__(
        self,
        config: VLMConfig,
        *,
        stage: str | None = "full",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        text_checkpoint: str | None = None,
        init_checkpoint: str | None = None,
        optim: OptimConfig | None = None,
        max_nonfinite: int = 10,
        activation_checkpointing: bool = False,
        caption_samples: int = 64,
        max_new_tokens: int = 32,
        label_smoothing: float = 0.0,
        objective: str = "next_token",
        preference: PreferenceConfig | None = None,
        lora: LoRASettings | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.stage, self.include, self.exclude = stage, list(include or []), list(exclude or [])
        self.text_checkpoint, self.init_checkpoint = text_checkpoint, init_checkpoint
        self.optim = optim or OptimConfig()
        self.max_nonfinite = max_nonfinite
        self.activation_checkpointing = activation_checkpointing
        self.compile_backend = compile_backend(compile)
        self.caption_samples, self.max_new_tokens = caption_samples, max_new_tokens
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        if objective == "dpo" and label_smoothing:
            raise ValueError("model.label_smoothing smooths the next-token loss; with model.objective dpo set it to 0 "
                             "(model.preference.label_smoothing is conservative DPO)")
        self.objective = objective
        self.preference = preference if isinstance(preference, PreferenceConfig) else PreferenceConfig(**(preference or {}))
        self.lora = lora_settings(lora)
        self.lora_run = None if self.lora is None else LoRARun(self.lora, text_checkpoint=text_checkpoint,
                                                                init_checkpoint=init_checkpoint)
        self.strict_loading = self.lora_run is None  # a LoRA checkpoint lacks the frozen base: on_load_checkpoint checks it
        # Plain values only, so that checkpoints load with weights_only=True.
        self.save_hyperparameters({"config": config.to_dict(), "stage": stage, "include": self.include,
                                   "exclude": self.exclude, "optim": asdict(self.optim), "objective": objective,
                                   "preference": asdict(self.preference),
                                   "lora": self.lora.to_dict() if self.lora else None})
        self.model: VisionLanguageModel | None = None
        self.reference: Reference | None = None  # dpo: the starting model, frozen (not a submodule), or its cache
        self._share_features = False
        self.nonfinite_steps = 0
        self._warned_sft_on_chosen = False
        self._captions: list[tuple[torch.Tensor, str, str]] = []
        self.last_captions: list[tuple[torch.Tensor, str, str]] = []

    def configure_model(self) -> None:
        """Built here, not in __init__, so that sharding strategies can wrap it as it is created."""
        if self.model is not None:
            return
        if self.lora_run is not None:
            self.lora_run.before_build()
        model = build_model(self.config)
        if self.text_checkpoint:
            model.load_text_backbone(self.text_checkpoint)
        if self.init_checkpoint:
            model.load_state_dict(initial_state(self.init_checkpoint, model.state_dict()), strict=True)
        if self.objective == "dpo":  # with LoRA, the policy itself with its adapters disabled: no copy
            self.reference = FrozenReference(model) if self.lora_run is None else AdapterReference(model)
        if self.lora_run is not None:
            self.lora_run.apply(model)
        self.parameter_table = set_trainable(model, self.stage, include=self.include, exclude=self.exclude)
        if self.lora_run is not None:
            self.lora_run.record_base(model)
        tower_frozen = not any(p.requires_grad for p in model.vision.parameters())
        self.model = self._parallelize(model, activation_checkpointing=self.activation_checkpointing)
        if self.reference is not None:
            if isinstance(self.reference, AdapterReference):
                self.reference.attach(self.model)
            else:  # sharded the same way; nothing to recompute under no_grad
                self.reference.model = self._parallelize(self.reference.model, activation_checkpointing=False)
                register_pair_forward(self.reference.model)
            register_pair_forward(self.model)
            # Sharing image features skips one model's tower, which is only safe when every rank
            # skips it: not when a rank without images must run it on a blank image.
            self._share_features = tower_frozen and not self.model.blank_image_when_missing

    def _parallelize(self, model: VisionLanguageModel, *, activation_checkpointing: bool) -> VisionLanguageModel:
        """Precision conversion, activation checkpointing and FSDP2, in the order they must happen."""
        trainer = self._trainer
        mesh = self.device_mesh
        if trainer is not None and trainer.world_size > 1:
            # DDP, FSDP1 and FSDP2 alike: a rank whose batch has no image still runs the tower and
            # fusion (on a blank image, with no effect), so every rank issues the same collectives.
            model.blank_image_when_missing = True
        if mesh is not None and mesh["tensor_parallel"].size() > 1 and type(trainer.precision_plugin).__name__ == "Float8Precision":
            raise UserError("fp8 (configs/precision/fp8.yaml) does not combine with tensor parallelism "
                             "(tensor_parallel_size > 1): drop one of them")
        if mesh is not None:
            # Lightning converts after configure_model, too late for sharded modules (fp8 needs
            # plain tensors); converting now is idempotent for every vlm precision plugin.
            model = trainer.precision_plugin.convert_module(model)
        if self.lora_run is not None:
            model = self.lora_run.prepare(model, trainer, mesh)
        if activation_checkpointing:
            apply_activation_checkpointing(blocks(model))
        if self.compile_backend is not None:  # after fp8 and checkpointing, before FSDP2 (torchtitan's order)
            compile_model(model, backend=self.compile_backend)
        if mesh is not None:
            if mesh["tensor_parallel"].size() > 1:
                apply_tensor_parallel(model.text, mesh["tensor_parallel"])
            if mesh["tensor_parallel"].size() == 1 or mesh["data_parallel"].size() > 1:
                # Also on one rank: the strategy's sharded checkpoints need DTensor parameters.
                param_dtype = torch.bfloat16 if str(trainer.precision).startswith("bf16") else None
                apply_fsdp2(model, mesh["data_parallel"], param_dtype=param_dtype)
        return model

    def _preference_step(self, batch: Any) -> PreferenceOutput:
        if self.reference is None:
            raise UserError("preference batches need model.objective dpo (--config configs/stage/dpo.yaml)")
        self.reference.place(self.trainer.precision_plugin, self.device, sharded=self.device_mesh is not None)
        return preference_step(self.model, self.reference, batch, self.preference, share_features=self._share_features)

    def on_fit_start(self) -> None:
        if isinstance(self.reference, (FrozenReference, AdapterReference)) and self.preference.reference == "cached":
            self.reference.place(self.trainer.precision_plugin, self.device, sharded=self.device_mesh is not None)
            self.reference = cache_reference(self.reference, self.trainer, self.config)  # the copy is freed

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """With LoRA, without the frozen parameters: what checkpoints hold (the base is rebuilt)."""
        state = super().state_dict(*args, **kwargs)
        if self.lora_run is None:
            return state
        return self.lora_run.trainable_state(state, prefix=f"{kwargs.get('prefix', '')}model.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:  # the reference's weights are rebuilt on resume, not stored
            checkpoint[CHECKPOINT_KEY] = {"fingerprint": self.reference.fingerprint}
        if self.lora_run is not None:
            checkpoint[LORA_KEY] = self.lora_run.identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:
            self.reference.check_checkpoint(checkpoint.get(CHECKPOINT_KEY), self.init_checkpoint)
        source = str(getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        if self.lora_run is not None:
            self.lora_run.check_checkpoint(checkpoint, set(self.state_dict()), source=source)
        elif is_lora_checkpoint(checkpoint):
            raise UserError(f"{source} is a LoRA run's checkpoint (adapters and trained tensors only): resume it with "
                            "its model.lora, or start a new run from it with model.init_checkpoint")

    def forward(self, batch: Any, **kwargs: Any):
        return self.model(batch, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        check_preference_batch(batch, self.objective)
        batch = self._sft_rows(batch)
        metrics, rows = {}, batch.input_ids.shape[0]
        if getattr(batch, "pairs", None) is not None:
            out = self._preference_step(batch)
            loss, metrics, rows = out.loss, out.metrics(), batch.pairs
        else:
            loss = self.model(batch, return_logits=False, label_smoothing=self.label_smoothing).loss
        aux = pop_aux_loss(self.model)  # MoE balancing and router z-losses of this forward
        if aux is not None:
            self.log("train/moe/aux_loss", aux.detach(), batch_size=rows)
            loss = loss + aux
        finite = bool(torch.isfinite(loss))
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            return self._skip_nonfinite(batch_idx)
        tokens = int((batch.labels != -100).sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        for name, value in metrics.items():  # TRL's names: rewards/chosen, rewards/accuracies, ...
            self.log(f"train/{name}", value, prog_bar=name == "rewards/accuracies", batch_size=rows)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        self.log("train/target_tokens", float(tokens), reduce_fx="sum")
        for name, value in moe_statistics(self.model).items():  # expert loads, dropped share, bias spread
            self.log(f"train/{name}", value, batch_size=rows)
        if self.compile_backend is not None:
            for name, value in compile_statistics().items():
                self.log(f"train/{name}", value, batch_size=rows)
        return loss

    def _sft_rows(self, batch: Any) -> Any:
        """Without a reference (model.objective next_token), preference pairs train their chosen answers."""
        if getattr(batch, "pairs", None) is None or self.reference is not None:
            return batch
        if not self._warned_sft_on_chosen:
            self._warned_sft_on_chosen = True
            log.info("preference pairs under model.objective next_token: training on the chosen answers "
                     "(add --config configs/stage/dpo.yaml for DPO)")
        return chosen_rows(batch)

    def _skip_nonfinite(self, batch_idx: int) -> None:
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        log.warning("non-finite loss at batch %d: step skipped (%d so far, limit %d)", batch_idx, self.nonfinite_steps, self.max_nonfinite)
        if self.nonfinite_steps > self.max_nonfinite:
            raise RuntimeError(f"{self.nonfinite_steps} steps with a non-finite loss (limit {self.max_nonfinite}); stopping")
        return None  # Lightning skips backward and the optimizer step

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_caption_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_caption_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, str]]:
        """Captions of every row: {"key", "caption", "reference"} (written by `CaptionWriter`)."""
        if getattr(batch, "pairs", None) is not None:
            batch = chosen_rows(batch)  # the pair's prompt, captioned once; reference: the chosen answer
        captions = self._caption_batch(batch, every_row=True)
        keys = batch.keys or tuple(str(batch_idx * batch.input_ids.shape[0] + i) for i in range(len(captions)))
        return [{"key": key, "caption": pred, "reference": ref} for key, (_, pred, ref) in zip(keys, captions)]

    def _evaluation_step(self, batch: Any, prefix: str) -> None:
        """Next-token loss, or on preference pairs the DPO loss and TRL's metrics; then captions
        (of a preference batch: from the shared prompt, scored against the chosen answer)."""
        batch = self._sft_rows(batch)
        if getattr(batch, "pairs", None) is not None:
            out = self._preference_step(batch)
            self.log(f"{prefix}/loss", out.loss, prog_bar=True, batch_size=batch.pairs, sync_dist=True)
            for name, value in out.metrics().items():
                self.log(f"{prefix}/{name}", value, batch_size=batch.pairs, sync_dist=True)
            batch = chosen_rows(batch)
        else:
            loss = self.model(batch, return_logits=False).loss
            self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=batch.input_ids.shape[0], sync_dist=True)
        # Each rank captions its share of `caption_samples`; a sharded model needs every rank to
        # join each generation, so they generate while any of them still wants captions.
        quota = -(-self.caption_samples // self.trainer.world_size)
        want = len(self._captions) < quota
        if self.trainer.world_size > 1:
            want = self.trainer.strategy.reduce_boolean_decision(want, all=False)
        if want:
            self._captions += self._caption_batch(batch)[: max(quota - len(self._captions), 0)]

    def _log_caption_metrics(self, prefix: str) -> None:
        """Metrics over the captions of every rank, so that all ranks log the same values."""
        pairs = [(pred, ref) for _, pred, ref in self._captions]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, pairs)
            pairs = [pair for part in gathered for pair in part]
        if pairs:
            metrics = caption_metrics([p for p, _ in pairs], [[r] for _, r in pairs])
            for name in ("exact_match", "bleu4", "cider_d"):  # identical on every rank; sync_dist only says so to Lightning
                self.log(f"{prefix}/{name}", float(metrics[name]), prog_bar=name == "exact_match", sync_dist=True)
        self.last_captions, self._captions = self._captions, []

    def _caption_batch(self, batch: Any, *, every_row: bool = False) -> list[tuple[torch.Tensor | None, str, str]]:
        """Generate from each row's prompt (everything before its first learned token; the whole
        row when nothing is learned and `every_row`)."""
        tokenizer = self.trainer.datamodule.tokenizer
        prompts, images, refs, shown = [], [], [], []
        for row in range(batch.input_ids.shape[0]):
            target = (batch.labels[row] != -100).nonzero().flatten()
            if len(target) == 0 and not every_row:
                continue
            end = int(target[0]) if len(target) else int(batch.attention_mask[row].sum())
            prompt = batch.input_ids[row, :end].tolist()
            row_images = [] if batch.pixel_values is None else list(batch.pixel_values[batch.image_sample_index == row])
            prompts.append(_collapse_images(prompt, self.config.image_token_id, self.model.tokens_per_image))
            images.append(row_images)
            refs.append(tokenizer.decode(batch.labels[row, target].tolist()).strip())
            shown.append(row_images[0].cpu() if row_images else None)
        dummy = not prompts and is_sharded(self.model) and self.trainer.world_size > 1
        if not prompts and not dummy:
            return []
        if dummy:  # this rank has nothing to caption but must join the others' collectives
            prompts, images = [[tokenizer.bos_id]], [[]]
        with unsharded_root(self.model):
            outputs = self.model.generate(images, prompts, max_new_tokens=self.max_new_tokens,
                                          stop_tokens=[tokenizer.eot_id], pad_id=tokenizer.pad_id,
                                          vocab_size=tokenizer.vocab_size)
        if dummy:
            return []
        return [(image, tokenizer.decode(out).strip(), ref) for image, out, ref in zip(shown, outputs, refs)]

    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(self.model, self.optim, total)
        # MoE bias balancing moves its biases after each optimizer step, by the loads routed since.
        optimizer.register_step_post_hook(lambda *_: update_expert_biases(self.model))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def initial_state(path: str, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model weights from a `vlm fit` checkpoint (a file, or a sharded run's directory; a LoRA
    run's with its base rebuilt and its adapters merged) or a directory written by `vlm export`
    (adapters merged); never unpickled. `template`: the model's own state dict."""
    from vlm.training.checkpointing import is_complete, read_metadata, read_sharded_model_state

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"model.init_checkpoint: {path} does not exist (a .ckpt from `vlm fit`, "
                                "a sharded checkpoint directory, or a `vlm export` directory)")
    if folder.is_dir() and (folder / "config.json").is_file():
        from vlm.export import load_model

        return merge_lora(load_model(path)).state_dict()  # an unmerged export: its adapters merged
    if not is_complete(folder):
        raise ValueError(f"model.init_checkpoint: {path} is not a complete checkpoint (truncated?)")
    checkpoint = read_metadata(folder) if folder.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    if is_lora_checkpoint(checkpoint):  # a LoRA run's: its base rebuilt, its adapters merged
        return merge_lora(model_from_lora_checkpoint(checkpoint, folder)).state_dict()
    if folder.is_dir():
        return read_sharded_model_state(folder, template)
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}


def _collapse_images(prompt: list[int], image_id: int, per_image: int) -> list[int]:
    """Expanded image spans back to one `<|image|>` per image (generate expands them again)."""
    out, run = [], 0
    for token in [*prompt, None]:
        if token == image_id:
            run += 1
            continue
        out += [image_id] * (run // per_image)
        run = 0
        if token is not None:
            out.append(token)
    return out
