"""Shared inputs for the vision tests (tiny towers take 32x32 images)."""

import pytest
import torch


@pytest.fixture
def pixels() -> torch.Tensor:
    """A fixed batch of two normalised-looking 32x32 images, [2, 3, 32, 32]."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
