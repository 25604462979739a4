"""VisionLanguageModel: one Llama, one vision encoder, one fusion, and the loop that joins them.

    images -> vision -> fusion.prepare --------------------------\\
    tokens -> text.tok_embeddings -> fusion.embed -> [fusion.before_layer(i) -> text.layers[i]] x L -> norm -> output

The Llama module is untouched: its state_dict loads into a plain `Llama` and exports with
`save_llama_hf`. No Lightning here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.checkpoints import load_llama
from vlm.fusion import Fusion, FusionConfig, build_fusion
from vlm.generation import SamplingConfig, beam_rows, decode, left_pad, ranks_finished
from vlm.text.llama import Cache, Llama, LlamaConfig
from vlm.text.loss import fused_linear_cross_entropy, shift_labels
from vlm.vision import VisionConfig, VisionEncoder, build_vision_encoder


@dataclass
class VLMConfig:
    """The whole model: text backbone, vision tower, fusion, and the id of `<|image|>`."""

    text: LlamaConfig = field(default_factory=LlamaConfig)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(model="vit_tiny_patch16_224"))
    fusion: FusionConfig = field(default_factory=FusionConfig)
    image_token_id: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = LlamaConfig.from_dict(self.text)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.fusion, dict):
            self.fusion = FusionConfig(**self.fusion)
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary (size {self.text.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VLMConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown VLMConfig keys {unknown}")
        return cls(**values)


@dataclass
class ModelInput:
    """The fields the model reads; the data layer's `Batch` has the same names."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None = None  # [B, T]
    pixel_values: torch.Tensor | None = None  # [N, 3, H, W]
    image_sample_index: torch.Tensor | None = None  # [N]
    labels: torch.Tensor | None = None  # [B, T]
    image_features: torch.Tensor | None = None  # [N, num_tokens, dim]: the frozen tower's cached outputs
    sample_ids: torch.Tensor | None = None  # [B, T]: packed rows' sample of each token, 0 = padding


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V], None when only the loss was asked for
    loss: torch.Tensor | None


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig, *, text: Llama, vision: VisionEncoder, fusion: Fusion) -> None:
        super().__init__()
        self.config = config
        self.text, self.vision, self.fusion = text, vision, fusion
        # Sharded multi-rank training sets this: a batch without images still runs the vision tower
        # and the fusion on a blank image (with no effect), so every rank issues the same collectives.
        self.blank_image_when_missing = False

    @property
    def tokens_per_image(self) -> int:
        return self.fusion.tokens_per_image

    def forward(self, batch: Any, *, cache: Cache | None = None, state: Any = None, return_logits: bool = True,
                label_smoothing: float = 0.0) -> ModelOutput:
        """Logits [B, T, V], and the mean next-token loss when `batch.labels` is set (with
        `label_smoothing`, that of `torch.nn.functional.cross_entropy`).

        With `return_logits=False` the loss is computed chunk by chunk without materialising logits.
        """
        h, _ = self.hidden(batch, cache=cache, state=state)
        labels = getattr(batch, "labels", None)
        loss = None
        if labels is not None:
            loss = fused_linear_cross_entropy(h, self.text.output.weight, shift_labels(labels),
                                              label_smoothing=label_smoothing)
        return ModelOutput(self.text.output(h) if return_logits else None, loss)

    def hidden(self, batch: Any, *, cache: Cache | None = None, state: Any = None) -> tuple[torch.Tensor, Any]:
        """The fusion loop. Returns final normalised hidden states [B, T, D] and the fusion state.

        A batch with `image_features` (a frozen tower's outputs, cached by `vlm features build`)
        skips the tower: those are exactly what `self.vision(pixel_values)` would return. Such a
        batch without images has them empty, [0, Nv, Dv] (`vlm.data.features.FeatureCollator`).

        A new batch (no `state` yet) is first checked by `fusion.check`, which reads tensor values
        and so runs only outside compilation: a compiled model refuses bad inputs with the same
        messages, before its compiled code runs. A decoding step (with `state`) is not re-checked:
        its tokens are sampled, and never `<|image|>`."""
        if state is None and not torch.compiler.is_compiling():
            self.fusion.check(batch)
        pixels = getattr(batch, "pixel_values", None)
        features = getattr(batch, "image_features", None)
        if features is not None and features.shape[0] > 0:
            state = self.fusion.prepare(features, batch, state)
        elif pixels is not None and pixels.shape[0] > 0:
            state = self.fusion.prepare(self.vision(pixels), batch, state)
        elif self.blank_image_when_missing and state is None:
            state = self.fusion.prepare_blank(self._blank_features(features), batch)
        else:
            state = self.fusion.prepare(None, batch, state)
        input_ids = batch.input_ids
        ctx = self.text.context(input_ids.shape[1], attention_mask=getattr(batch, "attention_mask", None),
                                cache=cache, batch_size=input_ids.shape[0],
                                sample_ids=getattr(batch, "sample_ids", None))
        h = self.fusion.embed(self.text.tok_embeddings(input_ids), state)
        for i, layer in enumerate(self.text.layers):
            h = self.fusion.before_layer(i, h, state)
            h = layer(h, ctx)
        return self.text.norm(h), state

    def _blank_features(self, features: torch.Tensor | None) -> torch.Tensor:
        """[1, Nv, Dv] of a blank image, for a batch without images. A batch of cached features gets
        zeros: no rank of a features run runs the tower in training, and all ranks must issue the
        same collectives. Any other batch gets the tower's output on an all-zero image."""
        if features is not None:
            return features.new_zeros(1, self.vision.num_tokens, self.vision.dim)
        size, device = self.vision.image_size, self.text.tok_embeddings.weight.device
        return self.vision(torch.zeros(1, 3, size, size, device=device, dtype=torch.float32))

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Sequence[torch.Tensor]] | None,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Sequence[int] = (),
        pad_id: int = 0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        vocab_size: int | None = None,
        sync_ranks: bool | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
        compile_step: bool = False,
    ) -> list[list[int]]:
        """Continue each prompt. `prompts[i]` holds one `<|image|>` token per image in `images[i]`
        (transformed tensors [3, H, W]); the model expands them as its fusion needs.
        `vocab_size` limits sampling to the tokenizer's ids when the embedding table is larger.

        `num_beams` > 1 runs beam search (`vlm.generation.beam_search`): every prompt, with its
        images, is repeated once per beam before the prompt forward, and after each step the text
        cache and the fusion state follow each beam's parent (`take_rows`). The penalties are
        those of `SamplingConfig` and look at the generated tokens only.

        `sync_ranks`: every rank of the process group decodes the same number of steps (one
        all-reduce per step decides when all are done), as a sharded model needs: each step
        gathers its shards with collectives that all ranks must join. The default (None) syncs
        when the model is sharded (FSDP1/FSDP2/tensor parallel) and more than one rank runs; every
        rank must then call generate the same number of times.
        `compile_step`: run each one-token decoding step through `torch.compile` (compiled once per
        model and reused; the cache position is a dynamic size after the first recompile). Off by
        default: on the CPU the step is bound by its matrix products and compiling does not pay.
        Returns the new tokens of each prompt, stop token excluded."""
        config = SamplingConfig(max_new_tokens, temperature, top_k, top_p, tuple(stop_tokens), num_beams,
                                length_penalty, no_repeat_ngram_size, repetition_penalty)
        batch = self._prompt_batch(images, prompts, pad_id, num_beams=num_beams)
        if sync_ranks is None:
            sync_ranks = is_sharded(self) and torch.distributed.get_world_size() > 1
        all_finished = (lambda done: ranks_finished(done, device=batch.input_ids.device)) if sync_ranks else None
        if not use_cache:
            return self._decode_uncached(batch, config, vocab_size=vocab_size, generator=generator,
                                         all_finished=all_finished)
        return self._decode_cached(batch, config, vocab_size=vocab_size, generator=generator, all_finished=all_finished,
                                   compile_step=compile_step)

    def _next_logits(self, h: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
        logits = self.text.output(h[:, -1])
        logits[:, self.config.image_token_id] = float("-inf")  # images come from the prompt, never sampled
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")  # rows the tokenizer has no token for
        return logits

    def decode_step(self, token: torch.Tensor, cache: Cache, state: Any, vocab_size: int | None
                    ) -> tuple[torch.Tensor, Any]:
        """One cached decoding step: tokens [R, 1] -> next-token logits [R, V] and the advanced fusion
        state. Free of host syncs and graph breaks, so that it compiles whole (`compile_step`)."""
        h, state = self.hidden(ModelInput(token), cache=cache, state=state)
        return self._next_logits(h, vocab_size), state

    def _compiled_decode_step(self) -> Callable:
        compiled = self.__dict__.get("_decode_step_compiled")
        if compiled is None:  # kept outside the module tree: not a submodule, not in the state dict
            compiled = self.__dict__["_decode_step_compiled"] = torch.compile(self.decode_step)
        return compiled

    def _decode_cached(self, batch: ModelInput, config: SamplingConfig, *, vocab_size, compile_step: bool = False,
                       **decode_options) -> list[list[int]]:
        cache = self.text.new_cache(batch.input_ids.shape[0], batch.input_ids.shape[1] + config.max_new_tokens)
        h, state = self.hidden(batch, cache=cache)
        holder = {"state": state}
        run_step = self._compiled_decode_step() if compile_step else self.decode_step

        def step(token: torch.Tensor) -> torch.Tensor:
            logits, holder["state"] = run_step(token, cache, holder["state"], vocab_size)
            return logits

        def reorder(rows: torch.Tensor) -> None:
            cache.reorder(rows)
            holder["state"] = take_rows(holder["state"], rows)

        return decode(step, self._next_logits(h, vocab_size), config, reorder=reorder, **decode_options)

    def _decode_uncached(self, batch: ModelInput, config: SamplingConfig, *, vocab_size, **decode_options) -> list[list[int]]:
        """Recompute everything each step: the reference the cache is tested against."""
        def step(token: torch.Tensor) -> torch.Tensor:
            batch.input_ids = torch.cat([batch.input_ids, token], 1)
            batch.attention_mask = torch.cat([batch.attention_mask, torch.ones_like(token)], 1)
            return self._next_logits(self.hidden(batch)[0], vocab_size)

        def reorder(rows: torch.Tensor) -> None:  # a beam's parent is a row of its prompt: same images
            batch.input_ids, batch.attention_mask = batch.input_ids[rows], batch.attention_mask[rows]

        return decode(step, self._next_logits(self.hidden(batch)[0], vocab_size), config, reorder=reorder, **decode_options)

    def _prompt_batch(self, images, prompts: Sequence[Sequence[int]], pad_id: int, *, num_beams: int = 1) -> ModelInput:
        """The left-padded prompt batch, each prompt and its images repeated `num_beams` times."""
        device = self.text.tok_embeddings.weight.device
        images = images or [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        image_id, per_image = self.config.image_token_id, self.tokens_per_image
        expanded = []
        for row, (prompt, row_images) in enumerate(zip(prompts, images)):
            marks = sum(int(t == image_id) for t in prompt)
            if marks != len(row_images):
                raise ValueError(f"prompt {row}: {marks} <|image|> tokens but {len(row_images)} image(s)")
            expanded.append([t for token in prompt for t in ([token] * (per_image if token == image_id else 1))])
        expanded, images = beam_rows(expanded, num_beams), beam_rows(images, num_beams)
        ids, mask = left_pad(expanded, pad_id, device=device)
        flat = [image for row_images in images for image in row_images]
        pixels = torch.stack(list(flat)).to(device) if flat else None
        owners = torch.tensor([row for row, r in enumerate(images) for _ in r], dtype=torch.long, device=device)
        return ModelInput(ids, mask, pixels, owners if flat else None)

    def load_text_backbone(self, path: str | Path) -> None:
        """Load Llama weights (Hugging Face or Meta layout) into the text backbone.

        A checkpoint with a smaller vocabulary (e.g. Llama 3 before `<|image|>` was added to its
        tokenizer) fills the first rows; the new rows start at the mean embedding."""
        loaded = load_llama(path)
        ours, theirs = self.text.config, loaded.config
        mismatched = [f.name for f in dataclasses.fields(LlamaConfig)
                      if f.name not in ("vocab_size", "max_seq_len", "dropout")
                      and _structure(f.name, getattr(ours, f.name)) != _structure(f.name, getattr(theirs, f.name))]
        if mismatched or theirs.vocab_size > ours.vocab_size:
            details = ", ".join(f"{n}: model {getattr(ours, n)} vs checkpoint {getattr(theirs, n)}" for n in mismatched + ["vocab_size"])
            raise ValueError(f"{path}: text backbone config does not match ({details})")
        state = loaded.state_dict()
        for key in ("tok_embeddings.weight", "output.weight"):
            if key in state and theirs.vocab_size < ours.vocab_size:
                old = state[key]
                new = old.mean(0, keepdim=True).expand(ours.vocab_size - theirs.vocab_size, -1)
                state[key] = torch.cat([old, new], 0)
        for name, buffer in self.text.named_buffers():  # a balancing bias starts at zero (Mixtral has none)
            if name.endswith("feed_forward.expert_bias") and name not in state:
                state[name] = torch.zeros_like(buffer)
        self.text.load_state_dict(state, strict=True)


def _structure(field: str, value: Any) -> Any:
    """A text config field as far as it decides the weights: an MoE config without its training-only
    settings (loss coefficients, bias rate, balancing), so a Mixtral checkpoint loads into any of them."""
    if field != "moe" or value is None:
        return value
    return dataclasses.replace(value, aux_loss_coef=0.0, bias_update_rate=0.0, z_loss_coef=0.0, balance="none")


def take_rows(state: Any, rows: torch.Tensor) -> Any:
    """A fusion state whose row i is row `rows[i]` of `state`: every tensor whose first dimension
    is the batch is indexed, through dataclasses, dicts, lists and tuples (Flamingo's latents,
    media index and cross-attention keys/values). A per-image tensor that happens to have as many
    rows is indexed too, which is harmless where the next step rebuilds it (LLaVA's state)."""
    if isinstance(state, torch.Tensor):
        return state[rows] if state.dim() and state.shape[0] == rows.shape[0] else state
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        fields = {f.name: take_rows(getattr(state, f.name), rows) for f in dataclasses.fields(state) if f.init}
        return dataclasses.replace(state, **fields)
    if isinstance(state, dict):
        return {key: take_rows(value, rows) for key, value in state.items()}
    if isinstance(state, list) or type(state) is tuple:
        return type(state)(take_rows(value, rows) for value in state)
    return state


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds parameters split across ranks (FSDP2/tensor-parallel DTensors, or
    FSDP1 units): running it then takes collectives that every rank must join."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return (any(isinstance(p, DTensor) for p in model.parameters())
            or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()))


def build_model(config: VLMConfig) -> VisionLanguageModel:
    """Build a randomly initialised text backbone and fusion around the configured vision encoder."""
    text = Llama(config.text)
    vision = build_vision_encoder(config.vision)
    fusion = build_fusion(config.fusion, text=config.text, vision_dim=vision.dim, vision_tokens=vision.num_tokens,
                          image_token_id=config.image_token_id)
    return VisionLanguageModel(config, text=text, vision=vision, fusion=fusion)
