"""How the DDP engine splits each DataLoader across ranks (`shard_loader`).

Decisions, per kind of loader (``train*`` keys train; every other key evaluates):

- **Map-style dataset, training.** An unshuffled loader or a plain ``shuffle=True`` one gets a
  `ResumableDistributedSampler` (torch's ``DistributedSampler``: one permutation shared by all
  ranks, padded to divide evenly). Any other sampler keeps its meaning: it is drawn once per epoch,
  identically on every rank, and dealt by `DistributedSamplerWrapper`. So
  ``RandomSampler(replacement=True, num_samples=n)`` and ``WeightedRandomSampler(w, n)`` draw
  ``n`` samples per epoch over ALL ranks (``n / world_size`` each, padded up to a multiple of the
  world size like ``DistributedSampler``), not ``n`` per rank and not ``len(dataset)``.
- **Map-style dataset, evaluation.** `UnpaddedDistributedSampler`: every index of the loader's
  sampler exactly once over all ranks, no padding, so metrics equal a single process's.
- **A custom ``batch_sampler``** (length bucketing, ...). Its batches are dealt whole, never
  regrouped: for training `DistributedBatchSamplerWrapper` (padded with repeated batches to the
  same number of batches on every rank, as ``DistributedSampler`` pads samples); for evaluation
  `UnpaddedDistributedSampler` over the batches (every batch exactly once).
- **IterableDataset.** No sampler exists, so the stream itself is dealt (`ShardedIterable`):
  rank ``r`` of ``n`` keeps stream positions ``r, r + n, r + 2n, ...`` (what ``DistributedSampler``
  does to indices ``0..N-1`` without shuffling), and its DataLoader workers take turns by
  batch, so every sample is produced once per epoch over all ranks and workers. Training needs
  the same number of batches on every rank (DDP all-reduces gradients every batch, and the
  runner's stop agreement counts train batches), without a collective per batch; the stream's
  length is unknown in advance, so a rank holds each batch until the stream shows that every
  rank has one: the last, partial round of the epoch is then padded by repeating its first items
  (``drop_last=False``, like ``DistributedSampler``: every rank gets ``ceil(N / n)`` samples) or
  dropped (``drop_last=True``). Evaluation keeps every sample exactly once (ranks may then differ
  by one batch). Every process runs the dataset's iterator through the whole stream and skips the
  other shards' items, so the stream must come out in the SAME order in every process: shuffle
  with a generator seeded identically on every rank (e.g. by the epoch), not with the global RNG
  (ddprun seeds that per rank). A dataset whose items are costly to produce, or that already
  splits its stream by ``get_worker_info()``, should split itself (next point).
- **Already sharded: left alone.** A loader whose sampler is a ``DistributedSampler`` or one of
  ddprun's, whose batch sampler is (or contains) one, and any dataset, sampler or batch sampler
  with the attribute ``shards_by_rank = True``. An IterableDataset that sets it reads only its
  own share (`stream_shard` tells it which) and must itself give every rank the same number of
  training batches.
- Anything that is not a torch DataLoader is left alone with a warning (every rank sees all of it).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    get_worker_info,
)

from ddprun.data.samplers import (
    DistributedBatchSamplerWrapper,
    DistributedSamplerWrapper,
    ResumableDistributedSampler,
    UnpaddedDistributedSampler,
)

__all__ = ["ShardedIterable", "seeded_shuffle", "shard_loader", "shards_by_rank", "stream_shard"]

_LOADER_KWARGS = (
    "batch_size",
    "num_workers",
    "collate_fn",
    "pin_memory",
    "drop_last",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)
_DISTRIBUTED = (
    DistributedSampler,
    DistributedSamplerWrapper,
    UnpaddedDistributedSampler,
)


def shards_by_rank(obj: Any) -> bool:
    """True when a dataset, sampler or batch sampler says it splits itself across ranks
    (``shards_by_rank = True``, on the class or the instance): ddprun then leaves its loader
    alone."""
    return getattr(obj, "shards_by_rank", False) is True


def stream_shard() -> tuple[int, int]:
    """``(shard, num_shards)`` of the calling process over ranks and DataLoader workers.

    For an IterableDataset that splits its own stream (``shards_by_rank = True``): call it in
    ``__iter__`` and keep shard ``shard`` of ``num_shards``; ``shard = rank * num_workers +
    worker id``. Outside a process group it falls back to ``RANK`` / ``WORLD_SIZE`` (set by every
    launcher; DataLoader workers started with "spawn" have no group), then to one process.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class ShardedIterable(IterableDataset):
    """One rank's share of an IterableDataset's stream (see the module docstring for the rule).

    The stream is read in rounds of ``world_size * batch_size`` items, one batch for every rank;
    rank ``r`` keeps the round's positions ``r, r + n, ...``, and DataLoader worker ``w`` of
    ``W`` handles rounds ``w, w + W, ...`` (skipping the others), so each worker's batches are
    whole rounds and come out of the DataLoader in stream order. Has a length when the dataset
    has one (this rank's sample count); other attributes are read from the dataset.

    Args:
        dataset: the IterableDataset; it must yield the same sequence in every process.
        rank, world_size: this process's place in the group.
        batch_size: the DataLoader's batch size (None: no batching, one item per batch).
        train: keep every rank's batch count equal (pad or drop the last partial round).
        drop_last: in training, drop the last partial round instead of padding it.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        rank: int,
        world_size: int,
        batch_size: int | None,
        train: bool,
        drop_last: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size - 1}], got rank={rank}")
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size or 1
        self.train, self.drop_last = train, drop_last

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._deal(iter(self.dataset), worker, workers)

    def _deal(self, stream: Iterator[Any], worker: int, workers: int) -> Iterator[Any]:
        n, rank = self.world_size, self.rank
        size = n * self.batch_size
        _consume(stream, worker * size)
        while True:
            # `head` pads a partial training round, `mine` is this rank's batch of the round;
            # both are held until the round's end shows whether every rank has a full batch
            mine, head, seen = [], [], 0
            for seen, item in enumerate(islice(stream, size), start=1):
                if seen <= n:
                    head.append(item)
                if (seen - 1) % n == rank:
                    mine.append(item)
            if seen == size or (seen and not self.train):
                yield from mine
            elif seen and not self.drop_last:
                padded = math.ceil(seen / n) * n
                yield from mine
                yield from (head[p % seen] for p in range(rank, padded, n) if p >= seen)
            if seen < size:
                return
            _consume(stream, (workers - 1) * size)  # the rounds of this rank's other workers

    def __len__(self) -> int:
        try:
            total = len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{type(self.dataset).__name__} has no length") from None
        n, batch = self.world_size, self.batch_size
        full, rest = divmod(total, n * batch)
        if not rest:
            extra = 0
        elif not self.train:
            extra = len(range(self.rank, rest, n))
        else:
            extra = 0 if self.drop_last else math.ceil(rest / n)
        return full * batch + extra

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes missing here; never during unpickling (no `dataset` yet)
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


def _consume(iterator: Iterator[Any], count: int) -> None:
    """Advances `iterator` by `count` items at C speed (or to its end)."""
    if count > 0:
        next(islice(iterator, count, count), None)


def shard_loader(loader: Any, key: str, rank: int, world_size: int, seed: int) -> Any:
    """`loader` split across ranks as the module docstring says (a new DataLoader, or `loader`
    itself when it needs nothing or cannot be split).

    Args:
        loader: usually a torch DataLoader.
        key: the loader's key; ``train*`` keys are training loaders.
        rank, world_size: this process's place in the group.
        seed: the run's seed (every rank passes the same); samplers add the epoch to it.
    """
    train = key.startswith("train")
    if not isinstance(loader, DataLoader):
        if rank == 0:
            warnings.warn(
                f"ddprun: loader {key!r} is a {type(loader).__name__}, not a torch DataLoader; "
                "it is not sharded across ranks, so every rank sees all of it. Use a DataLoader, "
                "or shard it yourself (e.g. ddprun.data.UnpaddedDistributedSampler).",
                stacklevel=3,
            )
        return loader
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        if shards_by_rank(dataset) or isinstance(dataset, ShardedIterable):
            return loader
        share = ShardedIterable(
            dataset, rank, world_size, loader.batch_size, train, drop_last=loader.drop_last
        )
        return _rebuild(loader, share)
    if loader.batch_size is None and loader.batch_sampler is not None:
        batches = loader.batch_sampler  # the user's own batch sampler
        if _sharded(batches) or _sharded(getattr(batches, "sampler", None)):
            return loader
        if train:
            new: Any = DistributedBatchSamplerWrapper(batches, world_size, rank, seed=seed)
        else:
            new = UnpaddedDistributedSampler(None, world_size, rank, sampler=batches)
        return _rebuild(loader, dataset, batch_sampler=new)
    sampler = loader.sampler
    if _sharded(sampler):
        return loader
    if not train:
        custom = None if isinstance(sampler, SequentialSampler) else sampler
        new = UnpaddedDistributedSampler(dataset, world_size, rank, sampler=custom)
    elif isinstance(sampler, SequentialSampler) or _is_permutation(sampler, dataset):
        shuffle = isinstance(sampler, RandomSampler)
        new = ResumableDistributedSampler(
            dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=loader.drop_last
        )
    else:  # any other sampler keeps its meaning (num_samples, replacement, weights)
        new = DistributedSamplerWrapper(
            sampler, world_size, rank, seed=seed, drop_last=loader.drop_last
        )
    return _rebuild(loader, dataset, sampler=new)


def seeded_shuffle(loader: Any, seed: int) -> Any:
    """A one-process training loader with ``shuffle=True`` drawing its order as a DDP world of
    one would (`ResumableDistributedSampler`, seeded by the run's seed and the epoch).

    So N ranks with batch b see, step by step, the same samples as one process with batch N*b
    (DDP rank r takes positions r, r+N, ... of the same permutation), and a mid-epoch resume
    skips indices instead of replaying batches. Any other loader is returned unchanged.
    """
    if (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size is not None
        and _is_permutation(loader.sampler, loader.dataset)
    ):
        return shard_loader(loader, "train", rank=0, world_size=1, seed=seed)
    return loader


def _sharded(obj: Any) -> bool:
    return isinstance(obj, _DISTRIBUTED) or shards_by_rank(obj)


def _is_permutation(sampler: Any, dataset: Any) -> bool:
    """A RandomSampler that draws each index of `dataset` once: ``shuffle=True``."""
    return (
        isinstance(sampler, RandomSampler)
        and not sampler.replacement
        and sampler.num_samples == len(dataset)
    )


def _rebuild(loader: DataLoader, dataset: Any, **sampling: Any) -> DataLoader:
    """A DataLoader like `loader` (workers, collate_fn, pinning, ...) over `dataset`."""
    kwargs = {name: getattr(loader, name) for name in _LOADER_KWARGS if hasattr(loader, name)}
    if "batch_sampler" in sampling:  # torch refuses batch_size / drop_last beside it
        kwargs.pop("batch_size", None)
        kwargs.pop("drop_last", None)
    if not kwargs.get("num_workers"):
        kwargs.pop("prefetch_factor", None)
        kwargs["persistent_workers"] = False
    return DataLoader(dataset, **sampling, **kwargs)
