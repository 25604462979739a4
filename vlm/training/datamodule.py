"""The LightningDataModule over the webdataset pipeline of `vlm.data`.

It needs two things from the model, read when the loaders are built: the vision encoder's image
transform and how many positions one image occupies (`tokens_per_image`). It keeps the number of
training batches consumed in its state, so a resumed run skips exactly those batches.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from vlm.data.collate import Collator
from vlm.data.corpus import write_corpus
from vlm.data.features import FeatureCollator, FeatureStore
from vlm.data.packing import Packer
from vlm.data.pipeline import PipelineConfig, SkipCounter, build_dataloader, expand_shards
from vlm.data.shapes import DEFAULT_VARIANTS, make_shapes_dataset
from vlm.errors import UserError
from vlm.features import check_cacheable, fingerprint
from vlm.text.chat import ChatTemplate
from vlm.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ShapesSpec:
    """Generate the synthetic shapes set under `out` when it is missing (and add any of
    `variants` that an existing set lacks)."""

    out: str = "data/shapes"
    train: int = 20000
    val: int = 500
    seed: int = 0
    image_size: int = 64
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))


class VLMDataModule(L.LightningDataModule):
    """Shards -> batches for a VisionLanguageModel.

    Args:
        train_shards / val_shards: shard paths, globs or brace patterns.
        test_shards: what `vlm test` scores (the validation metrics); predict_shards: what
            `vlm predict` captions.
        tokenizer: a tokenizer.json; trained on the training text (`tokenizer_vocab_size`) if missing.
        shapes: when set, the synthetic shapes set is generated first if its manifest is missing.
        handler: "skip" (count and drop bad samples) or "strict" (raise naming shard and key).
        features: a cache of the frozen vision tower's outputs over the training shards (made by
            `vlm features build`): training reads them instead of running the tower. Refused when
            the tower trains, the train transform is random, or the cache was made by another
            tower, checkpoint, image size or precision. Validation still runs the tower on images.
        pad_to_multiple_of: every batch's sequence length is rounded up to a multiple of it, so a
            compiled model sees a bounded number of shapes (None: padded to the longest row).
        packing: training rows hold several samples each, up to `max_length` tokens (else the text
            model's `max_seq_len`), first fit (`vlm.data.packing`); attention stays within each
            sample. Validation, test and predict batches keep one sample per row. Not for
            preference pairs.
    """

    def __init__(
        self,
        *,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        tokenizer: str = "data/shapes/tokenizer.json",
        tokenizer_vocab_size: int = 512,
        shapes: ShapesSpec | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        max_length: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        handler: str = "skip",
        max_skip_fraction: float = 0.05,
        features: str | None = None,
        pad_to_multiple_of: int | None = None,
        packing: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(packing, bool):
            raise UserError(f"data.packing must be true or false, got {packing!r}")
        self.packing = packing
        if pad_to_multiple_of is not None and (type(pad_to_multiple_of) is not int or pad_to_multiple_of < 1):
            raise UserError(f"data.pad_to_multiple_of must be a positive integer or null, got {pad_to_multiple_of!r}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.train_patterns, self.val_patterns = train_shards, val_shards
        self.test_patterns, self.predict_patterns = test_shards, predict_shards
        self.tokenizer_path, self.tokenizer_vocab_size = Path(tokenizer), tokenizer_vocab_size
        self.shapes = shapes
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.max_length, self.seed = num_workers, max_length, seed
        self.shuffle_buffer, self.handler, self.max_skip_fraction = shuffle_buffer, handler, max_skip_fraction
        self.features = features
        self.tokenizer: Tokenizer | None = None
        self.skips = SkipCounter()
        self.batches_consumed = 0  # advanced by the LightningModule, saved in checkpoints
        self._resume_skip = 0

    def prepare_data(self) -> None:
        """Runs on one process: generate the shapes set and the tokenizer when missing."""
        if self.shapes is not None:
            self._make_shapes(self.shapes)
        sources = self.tokenizer_path.with_suffix(".sources.json")
        if self.tokenizer_path.exists():
            fitting = self.trainer is None or self.trainer.state.fn == "fit"
            if fitting:
                self._check_tokenizer_sources(sources)
            return
        shards = self._shards(self.train_patterns, "train_shards")
        if self.shapes is not None:  # every variant's text, so that chat questions tokenize well too
            shards = sorted(set(shards) | {str(p) for p in Path(self.shapes.out).glob("*/train-*.tar")})
        corpus = self.tokenizer_path.with_suffix(".corpus.txt")
        self.tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        lines = write_corpus(shards, corpus)
        if lines == 0:
            raise UserError(f"data.train_shards {self.train_patterns!r}: no caption or text to train a tokenizer on")
        log.info("training a %d-token tokenizer on %d texts -> %s", self.tokenizer_vocab_size, lines, self.tokenizer_path)
        Tokenizer.train([corpus], self.tokenizer_vocab_size).save(self.tokenizer_path)
        sources.write_text(json.dumps([self._relative(s) for s in shards], indent=1))

    @staticmethod
    def _make_shapes(spec: ShapesSpec) -> None:
        """The whole set when there is none; else only the variants it lacks (e.g. preference
        pairs for DPO after supervised training on captions), with the same settings."""
        manifest_path = Path(spec.out) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        missing = [v for v in spec.variants if manifest is None or v not in manifest["variants"]]
        if not missing:
            return
        if manifest is not None:
            settings = {"seed": spec.seed, "image_size": spec.image_size, "splits": {"train": spec.train, "val": spec.val}}
            differ = sorted(k for k, v in settings.items() if manifest.get(k) != v)
            if differ:
                raise UserError(f"data.shapes: {spec.out} lacks variant(s) {missing}, and its {', '.join(differ)} differ "
                                f"from data.shapes ({settings}): delete {spec.out} or write the set elsewhere (data.shapes.out)")
        log.info("generating the shapes dataset (%s) in %s", ", ".join(missing), spec.out)
        made = make_shapes_dataset(spec.out, spec.train, spec.val, spec.seed, image_size=spec.image_size,
                                   variants=missing, overwrite=True, progress=True)
        if manifest is not None:  # make_shapes_dataset wrote a manifest of the new variants only
            made = {**manifest, "variants": manifest["variants"] + missing, "counts": {**manifest["counts"], **made["counts"]}}
            tmp = manifest_path.with_name("manifest.json.tmp")
            tmp.write_text(json.dumps(made, indent=2) + "\n")
            os.replace(tmp, manifest_path)

    def _check_tokenizer_sources(self, sources: Path) -> None:
        """A tokenizer vlm trained records its shards: reusing it for other data is an error, not a
        silent mismatch (a tokenizer given by the user, with no record, is used as it is)."""
        if not sources.is_file():
            return
        trained_on = set(json.loads(sources.read_text()))
        ours = {self._relative(s) for s in self._shards(self.train_patterns, "train_shards")}
        if self.shapes is not None:  # every variant of a shapes set has the vocabulary of its captions
            root, base = Path(self.shapes.out).resolve(), self.tokenizer_path.resolve().parent
            shapes = {path for path in ours | trained_on if (base / path).resolve().is_relative_to(root)}
            if shapes & trained_on:
                ours -= shapes
        if not ours <= trained_on:
            raise UserError(f"data.tokenizer {self.tokenizer_path} was trained on other shards ({sources.name} lists "
                            f"{len(trained_on)}, not {sorted(ours - trained_on)[0]}): give this data its own "
                            "--data.tokenizer path (trained when missing); for your own data use configs/own_data.yaml")

    def _relative(self, shard: str) -> str:
        """A shard's path as seen from the tokenizer's folder (stable when both move together)."""
        return os.path.relpath(Path(shard).resolve(), self.tokenizer_path.resolve().parent)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = Tokenizer.from_file(self.tokenizer_path)

    def check_model(self, model: Any) -> None:
        config = model.config
        if self.tokenizer.image_id != config.image_token_id:
            raise ValueError(f"{self.tokenizer_path}: <|image|> is id {self.tokenizer.image_id}, "
                             f"but the model's image_token_id is {config.image_token_id}")
        if self.tokenizer.vocab_size > config.text.vocab_size:
            raise ValueError(f"{self.tokenizer_path}: {self.tokenizer.vocab_size} tokens do not fit the model's "
                             f"vocab_size {config.text.vocab_size}")

    def _shards(self, patterns: str | list[str] | None, what: str) -> list[str]:
        shards = expand_shards(patterns or [])
        missing = [s for s in shards if not Path(s).is_file()]
        if not shards or missing:
            raise UserError(f"data.{what}: no shard at {missing[:3] if missing else patterns!r} (make shards with `vlm data ...`)")
        return shards

    def _loader(self, patterns, what: str, *, train: bool, whole: bool = False):
        """`whole`: every sample once, in order, on every rank (not split), collated as for `train`."""
        model = self.trainer.lightning_module.model
        self.check_model(model)
        features = self._feature_store(model) if train and self.features else None
        stream = train and not whole  # shuffled, endless
        packer = self._packer(model) if stream and self.packing else None
        collator = Collator(pad_id=self.tokenizer.pad_id, image_id=self.tokenizer.image_id,
                            image_token_count=model.tokens_per_image,
                            max_length=self.max_length if packer is None else packer.capacity,
                            features=features is not None, pad_to_multiple_of=self.pad_to_multiple_of)
        if features is not None:
            collator = FeatureCollator(collator, features)
        shards = self._shards(patterns, what)
        config = PipelineConfig(shards=shards, batch_size=self.batch_size if stream else self.val_batch_size,
                                seed=self.seed, shuffle=stream, shuffle_buffer=self.shuffle_buffer, resampled=stream,
                                handler=self.handler, max_skip_fraction=self.max_skip_fraction)
        workers = self.num_workers if stream else min(self.num_workers, len(shards))
        rank, world = (0, 1) if whole else (self.trainer.global_rank, self.trainer.world_size)
        transform = model.vision.train_transform if train else model.vision.transform
        return build_dataloader(config, ChatTemplate(self.tokenizer), transform=transform, collator=collator,
                                num_workers=workers, counter=self.skips if stream else None, rank=rank, world_size=world,
                                features=features, packer=packer)

    def _packer(self, model: Any) -> Packer:
        """Rows of `max_length` tokens, else the text model's `max_seq_len`; refused for DPO."""
        if getattr(self.trainer.lightning_module, "objective", "next_token") != "next_token":
            raise UserError("data.packing: model.objective dpo trains on preference pairs, which are not packed; "
                            "set data.packing false")
        return Packer(self.max_length or model.config.text.max_seq_len, image_token_count=model.tokens_per_image)

    def shard_loaders(self) -> dict[str, dict[str, Any]]:
        """{"train": {shard: loader}, "val": ...}: each shard's samples once, in order, on every rank,
        collated as training (or validation) collates them; for a pass that must see them all."""
        splits = {"train": (self.train_patterns, "train_shards"), "val": (self.val_patterns, "val_shards")}
        return {split: {shard: self._loader(shard, what, train=split == "train", whole=True)
                        for shard in self._shards(patterns, what)}
                for split, (patterns, what) in splits.items() if patterns is not None}

    def _feature_store(self, model: Any) -> FeatureStore:
        check_cacheable(model)
        return FeatureStore(self.features, expected=fingerprint(model, self.trainer.precision))

    def train_dataloader(self):
        return ResumedLoader(self._loader(self.train_patterns, "train_shards", train=True), self._take_resume_skip)

    def _take_resume_skip(self) -> int:
        skip, self._resume_skip = self._resume_skip, 0
        return skip

    def val_dataloader(self):
        if self.val_patterns is None:
            return []
        return self._even(self._loader(self.val_patterns, "val_shards", train=False))

    def test_dataloader(self):
        if self.test_patterns is None:
            raise ValueError("vlm test scores data.test_shards: set it (e.g. --data.test_shards 'data/x/val-*.tar')")
        return self._even(self._loader(self.test_patterns, "test_shards", train=False))

    def predict_dataloader(self):
        if self.predict_patterns is None:
            raise ValueError("vlm predict captions data.predict_shards: set it (e.g. --data.predict_shards 'data/x/val-*.tar')")
        return self._even(self._loader(self.predict_patterns, "predict_shards", train=False))

    def _even(self, loader):
        """Ranks may hold a batch more or less of a finite split; under sharding each batch is a
        collective, so all ranks stop at the first batch that one of them lacks."""
        if self.trainer.world_size == 1:
            return loader
        return EvenBatches(loader, lambda has: self.trainer.strategy.reduce_boolean_decision(has, all=True))

    def state_dict(self) -> dict[str, Any]:
        # The tokenizer path lets `vlm export` find the tokenizer the model was trained with.
        return {"batches_consumed": self.batches_consumed, "skips": self.skips.as_dict(),
                "tokenizer": str(self.tokenizer_path.resolve())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_consumed = self._resume_skip = int(state["batches_consumed"])


class ResumedLoader:
    """Iterates a loader after dropping the batches a resumed run already saw.

    `take_skip()` is asked when the first batch is requested: Lightning restores the data module's
    state after building the loaders, and creates an iterator it never reads before the real one.
    The pipeline is deterministic for a seed, so the batches after the skipped ones are those the
    interrupted run would have seen next."""

    def __init__(self, loader, take_skip) -> None:
        self.loader, self.take_skip = loader, take_skip

    def __iter__(self):
        iterator = iter(self.loader)
        for _ in range(self.take_skip()):
            next(iterator)
        yield from iterator


class EvenBatches:
    """Yields batches while `agree(this rank has one)` says every rank has one."""

    def __init__(self, loader, agree) -> None:
        self.loader, self.agree = loader, agree

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            batch = next(iterator, None)
            if not self.agree(batch is not None):
                return
            yield batch
