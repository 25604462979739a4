"""Training with Lightning: the only package of vlm that imports it."""

from vlm.training.callbacks import CaptionGrid, CaptionWriter, SaveOnInterrupt, StepProgressBar, TrainingState
from vlm.training.checkpointing import AtomicCheckpointIO, latest_complete_checkpoint
from vlm.training.datamodule import ShapesSpec, VLMDataModule
from vlm.training.module import VLMModule
from vlm.training.optim import OptimConfig, build_optimizer, param_groups, warmup_cosine

__all__ = [
    "AtomicCheckpointIO", "CaptionGrid", "CaptionWriter", "OptimConfig", "SaveOnInterrupt", "ShapesSpec", "StepProgressBar", "TrainingState", "VLMDataModule", "VLMModule",
    "build_optimizer", "latest_complete_checkpoint", "param_groups", "warmup_cosine",
]
