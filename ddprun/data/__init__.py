"""Data helpers: image transforms and distributed samplers with a resumable position."""

from ddprun.data.samplers import (
    DistributedSamplerWrapper,
    ResumableDistributedSampler,
    UnpaddedDistributedSampler,
)
from ddprun.data.transforms import Compose, Normalize, ToTensor

__all__ = [
    "Compose",
    "DistributedSamplerWrapper",
    "Normalize",
    "ResumableDistributedSampler",
    "ToTensor",
    "UnpaddedDistributedSampler",
]
