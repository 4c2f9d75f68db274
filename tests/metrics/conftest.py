"""Shared random classification data for the metrics tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

Maker = Callable[..., tuple[Tensor, Tensor]]


def _make(seed: int, num_samples: int = 300, num_classes: int = 7) -> tuple[Tensor, Tensor]:
    """Logits and targets where class 0 is never predicted and the last class never a target.

    Both kinds of empty class are where zero_division matters, so every test data set has them.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, num_classes, generator=generator)
    logits[:, 0] -= 50.0
    targets = torch.randint(0, num_classes - 1, (num_samples,), generator=generator)
    # Let the model be right more often than chance, so the metrics are not all near 1/C.
    right = torch.rand(num_samples, generator=generator) < 0.4
    logits[right, targets[right]] += 3.0
    return logits, targets


@pytest.fixture
def make_data() -> Maker:
    """Factory: `make_data(seed, num_samples=300, num_classes=7) -> (logits, targets)`."""
    return _make
