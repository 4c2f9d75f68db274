"""Global 2-D poolings (``catalyst.contrib.layers.pooling``): ``[N, C, H, W]`` to
``[N, C', 1, 1]``; ``out_features(C)`` gives ``C'`` for sizing the next layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GlobalAvgPool2d", "GlobalConcatPool2d", "GlobalMaxPool2d"]


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} expects an [N, C, H, W] tensor, got shape {tuple(x.shape)}")


class GlobalAvgPool2d(nn.Module):
    """The mean of every channel over its whole H x W plane."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``[N, C, 1, 1]`` means."""
        _check_4d(x, type(self).__name__)
        return F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def out_features(in_features: int) -> int:
        """Returns the number of output channels for ``in_features`` input channels."""
        return in_features


class GlobalMaxPool2d(nn.Module):
    """The maximum of every channel over its whole H x W plane."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``[N, C, 1, 1]`` maxima."""
        _check_4d(x, type(self).__name__)
        return F.adaptive_max_pool2d(x, 1)

    @staticmethod
    def out_features(in_features: int) -> int:
        """Returns the number of output channels for ``in_features`` input channels."""
        return in_features


class GlobalConcatPool2d(nn.Module):
    """Global average and global max pooling, concatenated along the channels (avg first)."""

    def __init__(self) -> None:
        super().__init__()
        self.avg = GlobalAvgPool2d()
        self.max = GlobalMaxPool2d()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``[N, 2C, 1, 1]``."""
        return torch.cat([self.avg(x), self.max(x)], dim=1)

    @staticmethod
    def out_features(in_features: int) -> int:
        """Returns the number of output channels for ``in_features`` input channels."""
        return in_features * 2
