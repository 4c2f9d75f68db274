"""Layers under Catalyst 21.12's ``catalyst.contrib.layers`` names (the ones its README and docs
examples use)."""

from ddprun.contrib.layers.common import Flatten, GaussianNoise, Lambda, Normalize, ResidualBlock
from ddprun.contrib.layers.pooling import GlobalAvgPool2d, GlobalConcatPool2d, GlobalMaxPool2d

__all__ = [
    "Flatten",
    "GaussianNoise",
    "GlobalAvgPool2d",
    "GlobalConcatPool2d",
    "GlobalMaxPool2d",
    "Lambda",
    "Normalize",
    "ResidualBlock",
]
