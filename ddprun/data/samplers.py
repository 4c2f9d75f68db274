"""Distributed samplers with a resumable position.

Four samplers, chosen by the DDP engine per loader (see ``ddprun.data.sharding``):

- ``ResumableDistributedSampler``: torch's ``DistributedSampler`` (training loaders; the same
  permutation on every rank for a given ``seed + epoch``, padded to divide evenly).
- ``DistributedSamplerWrapper``: shards the indices of ANY user sampler (for example a
  ``WeightedRandomSampler``); every rank draws the same list, then takes its stride.
- ``DistributedBatchSamplerWrapper``: the same for a user's batch sampler (length bucketing, ...):
  whole batches are dealt, so every rank runs the same number of training batches.
- ``UnpaddedDistributedSampler``: evaluation loaders; every index exactly once over all ranks, no
  padding, so loader metrics are exact.

Resuming in the middle of an epoch skips indices instead of replaying batches: ``state_dict()``
returns ``{"epoch", "start_index"}``, where ``start_index`` counts this rank's indices already
consumed in that epoch. After ``load_state_dict`` the next iteration of that epoch starts at
``start_index``; ``set_epoch`` with a different epoch resets it to 0, ``set_epoch`` with the same
epoch (the runner announcing the resumed epoch) keeps it.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler
from typing_extensions import override

__all__ = [
    "DistributedBatchSamplerWrapper",
    "DistributedSamplerWrapper",
    "ResumableDistributedSampler",
    "UnpaddedDistributedSampler",
]


def _resolve_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fills a missing world size / rank from the process group (1 and 0 without one)."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
    return num_replicas, rank


@contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seeds torch, numpy and python RNGs for the block, then restores their previous states.

    A user sampler may draw from any of the three global RNGs; seeding all of them makes every rank
    draw the same list without disturbing the training RNG streams.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _materialize(sampler: Sampler[Any], seed: int) -> list[Any]:
    """Draws one epoch of ``sampler``'s indices, identically on every process for a given seed.

    Samplers with a ``generator`` attribute (RandomSampler, WeightedRandomSampler,
    SubsetRandomSampler), and the ``sampler`` inside a batch sampler, get a fresh generator seeded
    with ``seed``; their own is put back after.
    """
    owners = [s for s in (sampler, getattr(sampler, "sampler", None)) if hasattr(s, "generator")]
    with _seeded_rngs(seed):
        originals = [owner.generator for owner in owners]
        try:
            for owner in owners:
                owner.generator = torch.Generator().manual_seed(seed)
            return list(sampler)
        finally:
            for owner, original in zip(owners, originals):
                owner.generator = original


class _ResumablePosition:
    """Owns the epoch and the rank-local position in it; subclasses supply the epoch's indices.

    ``_position`` counts indices handed out by the current iteration (including skipped ones), so
    with ``num_workers=0`` it equals the indices consumed. Loaders with worker processes fetch
    ahead, so callers that know the true count pass it to ``state_dict(start_index=...)``.
    """

    epoch: int

    def _init_position(self) -> None:
        self._pending_skip = 0
        self._position = 0

    @property
    def _position(self) -> int:
        """Indices handed out by the current iteration (skipped ones included)."""
        if self._iterator is None:
            return self._start
        # read off the list iterator instead of counting in a generator: no Python frame per
        # index in the hot loop
        return self._total - operator.length_hint(self._iterator)

    @_position.setter
    def _position(self, value: int) -> None:
        self._iterator: Iterator[Any] | None = None
        self._start = value

    def _epoch_indices(self) -> list[Any]:
        """Returns this rank's full list of indices for ``self.epoch``."""
        raise NotImplementedError

    def _epoch_length(self) -> int:
        """Returns how many indices this rank gets in a full epoch."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        indices = self._epoch_indices()
        # The skip applies to one iteration only: a second pass over the same epoch is complete.
        skip, self._pending_skip = self._pending_skip, 0
        self._total = len(indices)
        iterator = iter(indices[skip:])
        self._iterator = iterator
        return iterator

    def __len__(self) -> int:
        """Returns how many indices the next iteration yields (the full epoch minus any skip)."""
        return max(0, self._epoch_length() - self._pending_skip)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch; a different epoch than the current one restarts at position 0.

        Args:
            epoch: the epoch number (any integer; the runner passes its global epoch).
        """
        if epoch != self.epoch:
            self._pending_skip = 0
            self._position = 0
        self.epoch = epoch

    def state_dict(self, start_index: int | None = None) -> dict[str, int]:
        """Returns the position to resume from.

        Args:
            start_index: this rank's consumed indices, when the caller knows better than the
                sampler (loaders with workers fetch ahead). Defaults to the indices handed out.

        Returns:
            ``{"epoch": int, "start_index": int}``.
        """
        position = self._position if start_index is None else int(start_index)
        return {"epoch": int(self.epoch), "start_index": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores a position: the next iteration of ``state["epoch"]`` starts at ``start_index``.

        Args:
            state: a dict from ``state_dict()``.
        """
        missing = {"epoch", "start_index"} - set(state)
        if missing:
            raise KeyError(f"sampler state is missing {sorted(missing)}; got keys {sorted(state)}")
        start_index = int(state["start_index"])
        if not 0 <= start_index <= self._epoch_length():
            raise ValueError(
                f"start_index {start_index} is outside this rank's epoch of "
                f"{self._epoch_length()} indices"
            )
        self.epoch = int(state["epoch"])
        self._pending_skip = self._position = start_index


class ResumableDistributedSampler(_ResumablePosition, DistributedSampler):
    """torch's ``DistributedSampler`` with a resumable position (for training loaders).

    The permutation depends only on ``seed + epoch``, so it is the same on every rank; padding and
    ``drop_last`` behave exactly as in torch. Arguments are those of ``DistributedSampler``.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        num_replicas, rank = _resolve_world(num_replicas, rank)
        DistributedSampler.__init__(self, dataset, num_replicas, rank, shuffle, seed, drop_last)
        self._init_position()

    @override
    def _epoch_indices(self) -> list[int]:
        return list(DistributedSampler.__iter__(self))

    @override
    def _epoch_length(self) -> int:
        return self.num_samples


def _shard_bounds(length: int, num_replicas: int, rank: int) -> tuple[int, int]:
    """Returns ``[start, stop)`` of ``rank``'s contiguous block; the first ``length % n`` get one more."""
    base, extra = divmod(length, num_replicas)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class DistributedSamplerWrapper(_ResumablePosition, Sampler[Any]):
    """Shards the indices of any sampler across ranks.

    Each epoch the wrapped sampler is drawn once with RNGs seeded by ``seed + epoch`` (its own
    ``generator`` if it has one, else the global torch/numpy/python RNGs in a forked state), so
    every rank sees the same list. The list is padded by repeating its head (or trimmed with
    ``drop_last``) to a multiple of ``num_replicas``, as torch's ``DistributedSampler`` does, and
    rank ``r`` takes positions ``r, r + n, r + 2n, ...``.

    Args:
        sampler: any sampler with ``__len__`` (a user's own, ``WeightedRandomSampler``, ...).
        num_replicas: world size; defaults to the process group's (1 without one).
        rank: this process's rank; defaults to the process group's (0 without one).
        seed: base seed; must be the same on every rank.
        drop_last: trim instead of padding.
    """

    def __init__(
        self,
        sampler: Sampler[Any],
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.sampler = sampler
        self._init_shards(num_replicas, rank, seed, drop_last)

    def _init_shards(
        self, num_replicas: int | None, rank: int | None, seed: int, drop_last: bool
    ) -> None:
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._init_position()

    def _wrapped(self) -> Any:
        """The sampler whose list is dealt."""
        return self.sampler

    @property
    def total_size(self) -> int:
        """Returns the length of the padded (or trimmed) list shared by all ranks."""
        length, n = len(self._wrapped()), self.num_replicas
        rounded = length // n if self.drop_last else math.ceil(length / n)
        return rounded * n

    @override
    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch (see `_ResumablePosition.set_epoch`) and passes it on to the wrapped
        sampler when it has ``set_epoch`` (an epoch-aware user sampler reshuffles as it would
        alone)."""
        super().set_epoch(epoch)
        inner = self._wrapped()
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)

    @override
    def _epoch_length(self) -> int:
        return self.total_size // self.num_replicas

    @override
    def _epoch_indices(self) -> list[Any]:
        indices = _materialize(self._wrapped(), self.seed + self.epoch)
        total = self.total_size
        if len(indices) < total and indices:
            repeats = math.ceil((total - len(indices)) / len(indices))
            indices += (indices * repeats)[: total - len(indices)]
        return indices[:total][self.rank : total : self.num_replicas]


class DistributedBatchSamplerWrapper(DistributedSamplerWrapper):
    """Shards the batches of any batch sampler across ranks (training loaders).

    Each epoch the batch sampler is drawn once, seeded as in `DistributedSamplerWrapper`, so every
    rank sees the same list of batches; the list is padded by repeating its first batches (or
    trimmed with ``drop_last``) to a multiple of ``num_replicas`` and rank ``r`` takes batches
    ``r, r + n, r + 2n, ...``. Batches are never split or regrouped, so every rank runs the same
    number of batches (DDP's gradient all-reduce needs that) and a bucketing sampler's buckets
    stay intact. Give it to a DataLoader as ``batch_sampler``.

    The batch sampler is kept as ``batch_sampler``, not ``sampler``: the runner calls
    ``set_epoch`` on a loader's ``batch_sampler.sampler`` first, and this wrapper must get it (it
    passes it on to the batch sampler).

    Args:
        batch_sampler: any batch sampler with ``__len__`` (yields lists of indices).
        num_replicas, rank, seed, drop_last: as in `DistributedSamplerWrapper`.
    """

    def __init__(
        self,
        batch_sampler: Sampler[list[Any]],
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.batch_sampler = batch_sampler
        self._init_shards(num_replicas, rank, seed, drop_last)

    @override
    def _wrapped(self) -> Any:
        return self.batch_sampler


class UnpaddedDistributedSampler(_ResumablePosition, Sampler[Any]):
    """Splits indices across ranks without padding or duplicates (for evaluation loaders).

    Rank ``r`` gets one CONTIGUOUS block of the order (like ``numpy.array_split``): the first
    ``length % num_replicas`` ranks get one index more than the rest, and every index appears on
    exactly one rank. Contiguous blocks keep the dataset order when per-rank outputs are gathered
    rank by rank. ``set_epoch`` changes nothing in the order (it only resets a resumed position).

    Args:
        dataset_or_length: a sized dataset or a plain length; ignored when ``sampler`` is given.
        num_replicas: world size; defaults to the process group's (1 without one).
        rank: this process's rank; defaults to the process group's (0 without one).
        sampler: optional user sampler whose order is kept and split; drawn with a fixed seed so
            all ranks agree even if it is random.
    """

    def __init__(
        self,
        dataset_or_length: Sized | int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        sampler: Sampler[Any] | None = None,
    ) -> None:
        if sampler is None and dataset_or_length is None:
            raise ValueError("UnpaddedDistributedSampler needs a dataset, a length or a sampler")
        self.sampler = sampler
        self.length = self._length_of(dataset_or_length, sampler)
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        self.epoch = 0
        self._init_position()

    @staticmethod
    def _length_of(dataset_or_length: Sized | int | None, sampler: Sampler[Any] | None) -> int:
        if sampler is not None:
            return len(sampler)  # type: ignore[arg-type]
        if isinstance(dataset_or_length, int):
            if dataset_or_length < 0:
                raise ValueError(f"length must be >= 0, got {dataset_or_length}")
            return dataset_or_length
        return len(dataset_or_length)  # type: ignore[arg-type]

    @override
    def _epoch_length(self) -> int:
        start, stop = _shard_bounds(self.length, self.num_replicas, self.rank)
        return stop - start

    @override
    def _epoch_indices(self) -> list[Any]:
        start, stop = _shard_bounds(self.length, self.num_replicas, self.rank)
        if self.sampler is None:
            return list(range(start, stop))
        return _materialize(self.sampler, seed=0)[start:stop]
