"""What the loop needs to know about a loader and a batch: length, batch size, epoch.

Small, duck-typed readers: DataLoaders, iterable-style loaders and custom batch samplers all
answer them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def loader_length(loader: Any) -> int | None:
    """Batches in `loader`, or None for an iterable-style loader without a length."""
    try:
        return len(loader)
    except TypeError:  # iterable-style loaders have no length
        return None


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (first value of a dict,
    first item of a list or tuple); 1 for a scalar or an object without a length."""
    first = batch
    kind = type(batch)
    if (kind is tuple or kind is list) and batch:  # the common cases first: no ABC check
        first = batch[0]
    elif kind is dict or isinstance(batch, Mapping):
        first = next(iter(batch.values()), None)
    elif isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
    if isinstance(first, torch.Tensor):
        return int(first.shape[0]) if first.dim() else 1
    return len(first) if hasattr(first, "__len__") else 1


def loader_batch_size(loader: Any) -> int | None:
    """The loader's batch size (of its batch sampler when it has none), or None."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Tell the loader's sampler (or its iterable dataset) the epoch: samplers with
    ``set_epoch`` reshuffle with it (the first one found: sampler, inner, batch sampler)."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for candidate in (sampler, getattr(batch_sampler, "sampler", None), batch_sampler):
        if hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
            return
    # an iterable dataset reseeds its own stream (webdataset, HF datasets style)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
