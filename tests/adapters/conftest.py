import pytest
import torch
from torch import nn

from vlm.adapters import lora_parameters


def randomise_adapters(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """B away from zero (and DoRA magnitudes away from the row norms), so the adapters matter; the
    updates s B A are then about as large as the tiny models' weights (std 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def randomise():
    return randomise_adapters
