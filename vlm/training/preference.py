"""The DPO step of `VLMModule`: a preference batch's 2B rows through the policy and the frozen
reference, then `vlm.objectives.preference_loss`.

A preference batch (`Batch.pairs` = B) holds B chosen rows, then B rejected rows, and each pair's
images once. Its images are encoded once: their features go to both rows of their pair
(`image_features` twice, `image_sample_index` shifted by B for the rejected rows) in one pass of
all 2B rows. With a frozen tower the reference reuses the policy's features.

The reference is a frozen copy of the starting model (after `model.init_checkpoint` is loaded),
held outside the LightningModule's submodules: it is never in the optimizer, in DDP's parameters
or in checkpoints. A resumed run rebuilds it from the same `init_checkpoint`; its weights hash,
stored in every checkpoint, tells when that file has changed since. With `reference: cached` the
copy scores every training and validation pair once before training (files next to the shards,
reused by later runs) and is then freed: training looks its log-probs up by sample key.

With LoRA (`model.lora`) there is no copy: the reference is the policy itself with its adapters
disabled (as PEFT and TRL do) and the few tensors its stage trains fully (a projector, ...) set
back to their starting values for the pass (`AdapterReference`); it scores a batch before the
policy does, so that the policy's graph is built on the trained values.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.adapters import adapters_disabled, lora_parameters
from vlm.errors import UserError
from vlm.features import weights_hash
from vlm.model import ModelInput
from vlm.objectives import LOGPS_REDUCTION, PreferenceOutput, logps_for_loss, preference_loss, sequence_logprobs_from_hidden

OBJECTIVES = ("next_token", "dpo")
REFERENCES = ("frozen", "cached")
CHECKPOINT_KEY = "preference_reference"


@dataclasses.dataclass
class PreferenceConfig:
    """DPO-family loss settings (`model.preference`, used when `model.objective` is dpo).

    beta: strength of the KL anchor to the reference (IPO: the paper's tau).
    loss_type: "sigmoid" (DPO) or "ipo".
    label_smoothing: assumed probability that a pair's preference is flipped (conservative DPO,
        sigmoid only); 0 is plain DPO.
    sft_weight: weight of the chosen answers' next-token loss added to the DPO loss (RPO's alpha;
        TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, sft_weight]); 0 is plain DPO.
    reference: "frozen", a frozen copy of the starting model; or "cached", its log-probs of every
        training and validation pair computed once before training (`<shard>.reference-<hash>.json`
        next to each shard, reused while the starting model, model config, precision, max_length and
        tokenizer stay the same), after which the copy is freed.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "frozen"
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOGPS_REDUCTION:
            raise ValueError(f"model.preference.loss_type must be one of {sorted(LOGPS_REDUCTION)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"model.preference.beta must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"model.preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"model.preference.label_smoothing applies to loss_type sigmoid only, got "
                             f"{self.label_smoothing!r} with {self.loss_type!r}")
        if not (isinstance(self.sft_weight, (int, float)) and 0.0 <= self.sft_weight < float("inf")):
            raise ValueError(f"model.preference.sft_weight must be a finite number >= 0, got {self.sft_weight!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"model.preference.reference must be one of {list(REFERENCES)}, got {self.reference!r}")


def pair_logps(model: nn.Module, batch: Any, *, features: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row (sum of answer log-probs [2B] float32, answer token counts [2B]) of a preference
    batch in one pass, and the image features used ([N, tokens, dim], or None without images).

    `features`: the pairs' images already encoded (else `batch.image_features`, else the tower
    runs once on `batch.pixel_values`)."""
    pairs = batch.pairs
    if features is None:
        features = getattr(batch, "image_features", None)
    pixels = getattr(batch, "pixel_values", None)
    if features is None and pixels is not None and pixels.shape[0] > 0:
        features = model.vision(pixels)  # [N, tokens, dim]: once per pair
    rows = ModelInput(batch.input_ids, batch.attention_mask)
    if features is not None:  # also when empty: a cached-features batch without images runs no tower
        rows.image_features = torch.cat([features, features])
        owner = batch.image_sample_index  # [N] pair index = chosen row; rejected row = owner + B
        if owner is not None:
            rows.image_sample_index = torch.cat([owner, owner + pairs])
    hidden, _ = model.hidden(rows)
    sums, counts = sequence_logprobs_from_hidden(hidden, model.text.output.weight, batch.labels)
    return sums, counts, features


def register_pair_forward(model: nn.Module) -> None:
    """Make `pair_logps` a forward method of a `fully_shard`ed model (a no-op otherwise).

    FSDP2 gathers the root's parameters (embeddings, head, the tower's stem, ...) and arranges
    their gradient reduction around `forward` only; the pair pass calls the tower, the loop and
    the head itself, so it must run under the same hooks."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        model.pair_logps = types.MethodType(pair_logps, model)
        register_fsdp_forward_method(model, "pair_logps")


def run_pairs(model: nn.Module, batch: Any, *, features: torch.Tensor | None = None):
    """`pair_logps` through the registered forward method when the model is sharded."""
    registered = model.__dict__.get("pair_logps")
    return registered(batch, features=features) if registered else pair_logps(model, batch, features=features)


def check_preference_batch(batch: Any, objective: str) -> None:
    if objective == "dpo" and getattr(batch, "pairs", None) is None:
        raise UserError("model.objective dpo trains on preference pairs, but data.train_shards holds other samples "
                        "(make pairs with `vlm data shapes --variants preference` or `vlm data from-preference`)")


class Reference:
    """The reference policy's log-probs of preference batches; `fingerprint`: its weights' hash."""

    fingerprint: str

    def place(self, precision_plugin: Any, device: torch.device, *, sharded: bool) -> None:
        pass

    def logps(self, batch: Any, *, features: torch.Tensor | None, loss_type: str) -> torch.Tensor:
        raise NotImplementedError

    def check_checkpoint(self, stored: dict[str, Any] | None, init_checkpoint: str | None) -> None:
        if stored is None or stored.get("fingerprint") == self.fingerprint:
            return
        start = f"model.init_checkpoint {init_checkpoint}" if init_checkpoint else "the seeded random initialisation"
        raise UserError(f"the DPO reference rebuilt from {start} is not the model this run started from (weights "
                        "hash differs): resume with the same model.init_checkpoint, unchanged")


class FrozenReference(Reference):
    """A frozen copy of the starting policy, scoring preference batches under no_grad.

    Deliberately not an nn.Module: assigned to the LightningModule, it stays out of its submodules
    (so out of the optimizer, DDP and checkpoints) and out of its train()/eval() switches."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.fingerprint = weights_hash(self.model)  # before any sharding or precision conversion
        self.placed = False

    def place(self, precision_plugin: Any, device: torch.device, *, sharded: bool) -> None:
        """Once: the precision and device Lightning gives the policy after `configure_model`
        (a sharded reference got them with its sharding)."""
        if not self.placed and not sharded:
            self.model = precision_plugin.convert_module(self.model).to(device)
        self.placed = True

    @torch.no_grad()
    def logps(self, batch: Any, *, features: torch.Tensor | None, loss_type: str) -> torch.Tensor:
        """Per-row log-probs [2B] as `loss_type` expects them; `features`: the policy's, when the
        tower is frozen (the same weights in eval mode give the same features)."""
        sums, counts, _ = run_pairs(self.model, batch, features=features)
        if hasattr(self.model, "reshard"):  # FSDP2 keeps a root's parameters gathered after forward
            self.model.reshard()
        return logps_for_loss(sums, counts, loss_type=loss_type)

    def table(self, batches: Iterable[Any]) -> dict[str, list]:
        return score_table(self.model, batches, self.device)

    @property
    def device(self) -> torch.device:
        return self.model.text.tok_embeddings.weight.device


class AdapterReference(Reference):
    """The policy as it started, without a copy of it: its LoRA adapters disabled and the other
    tensors its stage trains at their starting values, in eval mode, under no_grad.

    Built before the adapters are applied (`fingerprint`: the starting model's hash, as a
    FrozenReference's); `attach` then takes the policy as it will train (adapted, sharded) and
    keeps a copy of the starting values of its trainable non-adapter parameters, usually a small
    part (nothing besides the adapters: no copy at all). Each pass also holds their trained values
    aside while it runs: a stage that trains the embeddings fully (instruct) pays for two copies of
    them, still far less than a FrozenReference's copy of the whole model."""

    def __init__(self, model: nn.Module) -> None:
        self.fingerprint = weights_hash(model)
        self.model: nn.Module | None = None
        self.start: dict[str, torch.Tensor] = {}

    def attach(self, policy: nn.Module) -> None:
        """The policy, adapted and parallelised (before any checkpoint is loaded into it)."""
        adapters = {id(p) for p in lora_parameters(policy)}
        self.model = policy
        self.start = {name: p.detach().clone() for name, p in policy.named_parameters()
                      if p.requires_grad and id(p) not in adapters}

    def place(self, precision_plugin: Any, device: torch.device, *, sharded: bool) -> None:
        """The starting values in the dtype and on the device the policy's parameters now have."""
        params = dict(self.model.named_parameters())
        self.start = {name: value.to(device=params[name].device, dtype=params[name].dtype)
                      for name, value in self.start.items()}

    @contextmanager
    def _as_started(self) -> Iterator[nn.Module]:
        """The policy as it started, for one pass; trained values and train mode restored after,
        bit for bit. A sharded root's gathered parameters are released before the restore."""
        params = dict(self.model.named_parameters())
        trained = {name: params[name].detach().clone() for name in self.start}
        training = self.model.training
        with torch.no_grad(), adapters_disabled(self.model):
            for name, value in self.start.items():
                params[name].copy_(value)
            self.model.eval()
            try:
                yield self.model
            finally:
                if hasattr(self.model, "reshard"):  # FSDP2 keeps a root's parameters gathered after forward
                    self.model.reshard()
                for name, value in trained.items():
                    params[name].copy_(value)
                self.model.train(training)

    def score(self, batch: Any, *, loss_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row log-probs [2B] as `loss_type` expects them, and the image features used (the
        policy's own when its tower is frozen: the tower has then no adapter and trains nothing)."""
        with self._as_started() as model:
            sums, counts, features = run_pairs(model, batch)
        return logps_for_loss(sums, counts, loss_type=loss_type), features

    def logps(self, batch: Any, *, features: torch.Tensor | None, loss_type: str) -> torch.Tensor:
        with self._as_started() as model:
            sums, counts, _ = run_pairs(model, batch, features=features)
        return logps_for_loss(sums, counts, loss_type=loss_type)

    def table(self, batches: Iterable[Any]) -> dict[str, list]:
        with self._as_started() as model:
            return score_table(model, batches, self.device)

    @property
    def device(self) -> torch.device:
        return self.model.text.tok_embeddings.weight.device


@torch.no_grad()
def score_table(model: nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, list]:
    """key -> [chosen sum, chosen count, rejected sum, rejected count] for every pair of `batches`."""
    entries: dict[str, list] = {}
    for batch in batches:
        sums, counts, _ = run_pairs(model, batch.to(device))
        if hasattr(model, "reshard"):
            model.reshard()
        pairs = batch.pairs
        for row, key in enumerate(batch.keys[:pairs]):
            entries[key] = [float(sums[row]), int(counts[row]), float(sums[pairs + row]), int(counts[pairs + row])]
    return entries


class CachedReference(Reference):
    """The frozen copy's log-probs of every pair, looked up by sample key (see `cache_reference`)."""

    def __init__(self, entries: dict[str, list], fingerprint: str) -> None:
        self.entries, self.fingerprint = entries, fingerprint

    def logps(self, batch: Any, *, features: torch.Tensor | None, loss_type: str) -> torch.Tensor:
        keys = batch.keys[: batch.pairs]
        missing = [key for key in keys if key not in self.entries]
        if missing:
            raise UserError(f"model.preference.reference cached: no reference log-probs for sample {missing[0]!r} "
                            "(the cache covers data.train_shards and data.val_shards as they were at the start)")
        rows = torch.tensor([self.entries[key] for key in keys], dtype=torch.float64)  # [B, 4]
        sums, counts = torch.cat([rows[:, 0], rows[:, 2]]), torch.cat([rows[:, 1], rows[:, 3]])
        return logps_for_loss(sums.float(), counts.long(), loss_type=loss_type).to(batch.input_ids.device)


def cache_reference(reference: FrozenReference | AdapterReference, trainer: Any, config: Any) -> CachedReference:
    """The reference's log-probs of every pair of the data module's training and validation shards.

    Each shard's are stored as `<shard>.reference-<hash>.json` ({"settings", "logps": {key: [...]}})
    and recomputed when missing or made under other settings. Every rank makes the same passes over
    the same data (a sharded reference needs them all); rank 0 writes the files."""
    data = trainer.datamodule
    if not hasattr(data, "shard_loaders"):
        raise UserError("model.preference.reference cached reads the shards through vlm's data module (vlm fit)")
    settings = {"fingerprint": reference.fingerprint, "config": config.to_dict(), "precision": str(trainer.precision),
                "max_length": data.max_length, "tokenizer_sha256": hashlib.sha256(data.tokenizer_path.read_bytes()).hexdigest()}
    trainer.strategy.barrier()  # every rank decides what to compute from the same files
    todo = {}
    for shards in data.shard_loaders().values():
        for shard, batches in shards.items():
            path = Path(f"{shard}.reference-{reference.fingerprint[:16]}.json")
            stored = json.loads(path.read_text()) if path.is_file() else None
            todo[path] = (shard, batches, stored["logps"] if stored and stored["settings"] == settings else None)
    trainer.strategy.barrier()
    entries: dict[str, list] = {}
    for path, (shard, batches, stored) in todo.items():
        if stored is None:
            with trainer.precision_plugin.forward_context():  # the numerics of the training steps (autocast)
                stored = reference.table(batches)
            if trainer.is_global_zero:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps({"settings": settings, "logps": stored}))
                os.replace(tmp, path)
        clash = next((key for key, value in stored.items() if entries.get(key, value) != value), None)
        if clash is not None:
            raise UserError(f"model.preference.reference cached: sample key {clash!r} of {shard} is another pair's "
                            "in an earlier shard: the cache needs keys unique across data.train_shards and data.val_shards")
        entries.update(stored)
    trainer.strategy.barrier()
    return CachedReference(entries, reference.fingerprint)


def preference_step(model: nn.Module, reference: Reference, batch: Any, config: PreferenceConfig, *,
                    share_features: bool) -> PreferenceOutput:
    """The DPO-family loss of a preference batch and TRL's metrics (`PreferenceOutput.metrics()`).

    `share_features`: the tower is frozen and every rank takes the same path, so the reference
    reuses the policy's image features instead of running its own tower (an AdapterReference,
    which runs first, gives the policy its own)."""
    if isinstance(reference, AdapterReference):  # the policy's own modules: scored before its graph is built
        reference_logps, features = reference.score(batch, loss_type=config.loss_type)
        sums, counts, _ = run_pairs(model, batch, features=features if share_features else None)
    else:
        sums, counts, features = run_pairs(model, batch)
        reference_logps = reference.logps(batch, features=features if share_features else None, loss_type=config.loss_type)
    policy = logps_for_loss(sums, counts, loss_type=config.loss_type)
    out = preference_loss(*policy.chunk(2), *reference_logps.chunk(2), beta=config.beta,
                          loss_type=config.loss_type, label_smoothing=config.label_smoothing)
    return out.with_sft(sums, counts, config.sft_weight) if config.sft_weight else out


def chosen_rows(batch: Any) -> Any:
    """The B chosen rows of a preference batch as an ordinary batch (images index its rows)."""
    pairs = batch.pairs
    keys = batch.keys[:pairs] if batch.keys else batch.keys
    return dataclasses.replace(batch, input_ids=batch.input_ids[:pairs], labels=batch.labels[:pairs],
                               attention_mask=batch.attention_mask[:pairs], keys=keys, pairs=None)
