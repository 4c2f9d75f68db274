"""Data helpers: image transforms, distributed samplers with a resumable position, and how the
DDP engine shards loaders (`shard_loader`, `ShardedIterable` for IterableDatasets)."""

from ddprun.data.sampler import BalanceClassSampler, BatchBalanceClassSampler
from ddprun.data.samplers import (
    DistributedBatchSamplerWrapper,
    DistributedSamplerWrapper,
    ResumableDistributedSampler,
    UnpaddedDistributedSampler,
)
from ddprun.data.sharding import ShardedIterable, shard_loader, shards_by_rank, stream_shard
from ddprun.data.transforms import Compose, Normalize, ToTensor

__all__ = [
    "BalanceClassSampler",
    "BatchBalanceClassSampler",
    "Compose",
    "DistributedBatchSamplerWrapper",
    "DistributedSamplerWrapper",
    "Normalize",
    "ResumableDistributedSampler",
    "ShardedIterable",
    "ToTensor",
    "UnpaddedDistributedSampler",
    "shard_loader",
    "shards_by_rank",
    "stream_shard",
]
