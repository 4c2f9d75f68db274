"""Small modules Catalyst 21.12 examples build models from (``catalyst.contrib.layers.common``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Flatten", "GaussianNoise", "Lambda", "Normalize", "ResidualBlock"]


class Flatten(nn.Module):
    """Flattens every sample: ``[N, ...]`` becomes ``[N, prod(...)]`` (N is kept, even when 0).

    Unlike ``x.view``, it also takes non-contiguous input (a transposed or sliced tensor).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x`` reshaped to ``[N, -1]``."""
        return x.reshape(x.shape[0], -1)


class Lambda(nn.Module):
    """Wraps a function as a module, e.g. ``Lambda(lambda x: x.view(-1, 128, 7, 7))``.

    A lambda cannot be pickled: in spawn mode (the DDP engine starting its own workers from
    ``python script.py``) pass a function defined at module level; under ``python -m ddprun``
    every worker runs the script itself, so lambdas are fine there.

    Args:
        lambda_fn: called with the module's input; its result is the output.
    """

    def __init__(self, lambda_fn: Callable[[Any], Any]) -> None:
        super().__init__()
        if not callable(lambda_fn):
            raise TypeError(f"Lambda needs a callable, got {type(lambda_fn).__name__}")
        self.lambda_fn = lambda_fn

    def forward(self, x: Any) -> Any:
        """Returns ``lambda_fn(x)``."""
        return self.lambda_fn(x)


class Normalize(nn.Module):
    """L_p-normalises its input: ``torch.nn.functional.normalize(x, **normalize_kwargs)``
    (by default the L2 norm over dim 1).

    Args:
        **normalize_kwargs: ``p``, ``dim``, ``eps`` of ``torch.nn.functional.normalize``.
    """

    def __init__(self, **normalize_kwargs: Any) -> None:
        super().__init__()
        unknown = set(normalize_kwargs) - {"p", "dim", "eps"}
        if unknown:
            raise TypeError(f"Normalize takes p, dim and eps; got unknown {sorted(unknown)}")
        self.normalize_kwargs = normalize_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x`` divided by its norm."""
        return F.normalize(x, **self.normalize_kwargs)


class GaussianNoise(nn.Module):
    """Adds ``N(0, stddev^2)`` noise to its input in training mode; identity in eval mode.

    Decision: like dropout, the noise is a training-time regulariser, so ``model.eval()``
    turns it off (Catalyst 21.12's version returns None, a defect).

    Args:
        stddev: standard deviation of the noise (>= 0).
    """

    def __init__(self, stddev: float = 0.1) -> None:
        super().__init__()
        if stddev < 0:
            raise ValueError(f"stddev must be >= 0, got {stddev}")
        self.stddev = stddev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x`` plus noise (training) or ``x`` (eval)."""
        if not self.training or self.stddev == 0:
            return x
        return x + torch.randn_like(x) * self.stddev


class ResidualBlock(nn.Module):
    """A skip connection around a block: ``block(x) + x``.

    Args:
        block: a module whose output has the shape of its input.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``block(x) + x``."""
        return self.block(x) + x
