"""Issue 10, items 6 and 7: IterableDatasets under DDP, and samplers that keep their meaning.

Real processes (2 ranks on gloo, through ``python -m ddprun --nproc 2`` or spawn mode) run
tests/workloads/scripts/sharded_loaders.py, where every rank records the sample ids of every
batch it ran; distributed metrics are compared with a one-process run of the same data. The
in-process tests check the dealing rules on real DataLoaders (worker processes included) over
more shapes than the real runs can afford.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from ddprun.data import (
    DistributedBatchSamplerWrapper,
    DistributedSamplerWrapper,
    ResumableDistributedSampler,
    ShardedIterable,
    UnpaddedDistributedSampler,
    shard_loader,
)
from tests.workloads.helpers import assert_metrics_close, ddprun, load_metrics, run, script

pytestmark = pytest.mark.timeout(240)

EPOCHS = ("1", "2")


def _ranks(folder: Path, world: int = 2) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def _batches(ranks: list[dict], epoch: str, loader: str) -> list[list[list[int]]]:
    return [rank["batches"][f"{epoch}/{loader}"] for rank in ranks]


def _ids(per_rank: list[list[list[int]]]) -> list[int]:
    return sorted(i for batches in per_rank for batch in batches for i in batch)


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------- IterableDataset
@pytest.fixture(scope="module")
def iterable_single(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("iterable_single")
    args = ("--out", str(folder), "--case", "iterable", "--batch-size", "16")
    _ok(run(script("sharded_loaders", *args), folder, timeout=120))
    return folder


def test_iterable_dataset_two_ranks_two_workers_every_sample_once_metrics_as_one_process(
    iterable_single, tmp_path
):
    """ddprun --nproc 2, num_workers=2, batch 8 a rank == one process with batch 16."""
    args = ("--out", str(tmp_path), "--case", "iterable", "--engine", "ddp", "--workers", "2")
    _ok(run(ddprun(2, "sharded_loaders", *args), tmp_path, timeout=180))
    ranks = _ranks(tmp_path)
    for rank in ranks:
        assert rank["types"] == {
            "train": "ShardedIterable",
            "valid": "ShardedIterable",
            "valid_self": "SelfSharded",  # shards_by_rank = True: left alone
        }
    for epoch in EPOCHS:
        for loader, size in (("train", 64), ("valid", 37), ("valid_self", 37)):
            per_rank = _batches(ranks, epoch, loader)
            assert _ids(per_rank) == list(range(size)), (epoch, loader)
        train = _batches(ranks, epoch, "train")
        # the same number of train batches on every rank, each a full batch of 8
        assert [[len(b) for b in batches] for batches in train] == [[8] * 4, [8] * 4]
    got, expected = load_metrics(tmp_path), load_metrics(iterable_single)
    assert got["world_size"] == 2
    assert_metrics_close(expected, got, ("train", "valid", "valid_self"), tol=1e-5)


def test_iterable_train_tail_padded_or_dropped_with_equal_batch_counts(tmp_path):
    """37 samples, batch 4, 2 ranks x 2 workers: 4 full rounds of 8 and 5 samples left. Without
    drop_last they are padded to 6 (every rank 19 samples, 5 batches, like DistributedSampler);
    with drop_last they are dropped (4 batches a rank, samples 0..31 once)."""
    args = ("--out", str(tmp_path), "--case", "tail", "--engine", "ddp", "--workers", "2")
    _ok(run(ddprun(2, "sharded_loaders", *args), tmp_path, timeout=180))
    ranks = _ranks(tmp_path)
    for epoch in EPOCHS:
        padded = _batches(ranks, epoch, "train")
        assert [len(batches) for batches in padded] == [5, 5]
        assert [sum(map(len, batches)) for batches in padded] == [19, 19]
        ids = _ids(padded)
        assert sorted(set(ids)) == list(range(37))
        assert len(ids) == 38  # one sample repeated as padding, nothing else twice
        dropped = _batches(ranks, epoch, "train_drop")
        assert [[len(b) for b in batches] for batches in dropped] == [[4] * 4, [4] * 4]
        assert _ids(dropped) == list(range(32))


# ------------------------------------------------------------------------------- samplers
@pytest.fixture(scope="module")
def samplers_single(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("samplers_single")
    _ok(run(script("sharded_loaders", "--out", str(folder), "--case", "samplers"), folder))
    return folder


def test_samplers_keep_their_meaning_over_all_ranks(samplers_single, tmp_path):
    """Spawn mode, 2 ranks: num_samples counts over all ranks, bucketed batches are dealt whole
    (equal train batch counts, every eval batch once), eval metrics as one process."""
    args = ("--out", str(tmp_path), "--case", "samplers", "--engine", "ddp", "--world-size", "2")
    _ok(run(script("sharded_loaders", *args), tmp_path, timeout=180))
    ranks, (single,) = _ranks(tmp_path), _ranks(samplers_single, world=1)
    for epoch in EPOCHS:
        # RandomSampler(replacement=True, num_samples=200), batch 2: 200 samples in all
        assert len(_ids(_batches([single], epoch, "train_random"))) == 200
        random = _batches(ranks, epoch, "train_random")
        assert [len(batches) for batches in random] == [50, 50]
        assert len(_ids(random)) == 200
        # WeightedRandomSampler(num_samples=60), zero weight on ids >= 10
        weighted = _batches(ranks, epoch, "train_weighted")
        assert [len(batches) for batches in weighted] == [10, 10]
        ids = _ids(weighted)
        assert len(ids) == 60 and max(ids) < 10
        # bucketing batch_sampler: 9 batches, dealt whole, padded to 5 a rank
        alone = _batches([single], epoch, "train_bucket")[0]
        dealt = _batches(ranks, epoch, "train_bucket")
        assert len(alone) == 9
        assert [len(batches) for batches in dealt] == [5, 5]
        flat = [tuple(batch) for batches in dealt for batch in batches]
        assert set(flat) == {tuple(batch) for batch in alone}  # whole batches, all of them
        assert Counter(Counter(flat).values()) == {1: 8, 2: 1}  # one padding repeat
        # evaluation: every batch of the batch sampler exactly once
        alone = _batches([single], epoch, "valid_bucket")[0]
        dealt = _batches(ranks, epoch, "valid_bucket")
        assert sorted(tuple(b) for batches in dealt for b in batches) == sorted(
            tuple(b) for b in alone
        )
    for rank in ranks:  # set_epoch reached the user's batch sampler through the wrapper
        assert rank["bucket_epochs"]["train_bucket"] == [1, 2]
    assert_metrics_close(
        load_metrics(samplers_single), load_metrics(tmp_path), ("valid", "valid_bucket"), 1e-6
    )


# ------------------------------------------------------- the dealing rules, in one process
class _Stream(IterableDataset):
    def __init__(self, n: int, sized: bool):
        self.n, self.sized = n, sized

    def __iter__(self):
        return iter(torch.arange(self.n).tolist())

    def __len__(self):
        if not self.sized:
            raise TypeError("no length")
        return self.n


@pytest.mark.parametrize(
    ("n", "world", "batch", "workers"),
    [(37, 2, 4, 2), (50, 3, 3, 2), (7, 3, 4, 0), (48, 2, 4, 0), (2, 3, 2, 0)],
)
@pytest.mark.parametrize(("train", "drop_last"), [(False, False), (True, False), (True, True)])
def test_sharded_iterable_on_real_dataloaders(n, world, batch, workers, train, drop_last):
    """Every rank of `world`, simulated here (rank given explicitly), through a real DataLoader:
    evaluation reads every sample once; training gives every rank the same number of batches,
    the padded epoch ceil(n / world) samples a rank, the dropped one full rounds only; the
    DataLoader's length is the number of batches it yields."""
    per_rank = []
    for rank in range(world):
        share = ShardedIterable(_Stream(n, sized=True), rank, world, batch, train, drop_last)
        loader = DataLoader(share, batch_size=batch, num_workers=workers, drop_last=drop_last)
        batches = [b.tolist() for b in loader]
        assert len(loader) == len(batches), (rank, batches)
        per_rank.append(batches)
    ids = _ids(per_rank)
    if not train:
        assert ids == list(range(n))
        return
    counts = [len(batches) for batches in per_rank]
    assert len(set(counts)) == 1, per_rank
    if drop_last:
        assert ids == list(range(n // (world * batch) * world * batch))
    else:
        assert sorted(set(ids)) == list(range(n))
        assert [sum(map(len, b)) for b in per_rank] == [-(-n // world)] * world


def test_sharded_iterable_without_length_has_no_loader_length():
    share = ShardedIterable(_Stream(5, sized=False), 0, 2, 2, train=False)
    with pytest.raises(TypeError, match="_Stream has no length"):
        len(DataLoader(share, batch_size=2))


def _loader(**kwargs) -> DataLoader:
    data = TensorDataset(torch.arange(20))
    return DataLoader(data, **kwargs)


def test_shard_loader_picks_a_sampler_that_keeps_the_meaning():
    data = TensorDataset(torch.arange(20))
    plain = shard_loader(_loader(batch_size=2, shuffle=True), "train", 1, 2, seed=3)
    assert isinstance(plain.sampler, ResumableDistributedSampler) and len(plain) == 5
    draws = RandomSampler(data, replacement=True, num_samples=200)
    drawn = shard_loader(_loader(batch_size=2, sampler=draws), "train", 1, 2, seed=3)
    assert isinstance(drawn.sampler, DistributedSamplerWrapper) and len(drawn) == 50
    weights = WeightedRandomSampler(torch.ones(20), num_samples=60)
    weighted = shard_loader(_loader(batch_size=3, sampler=weights), "train", 0, 2, seed=3)
    assert len(weighted) == 10
    evaluated = shard_loader(_loader(batch_size=2, sampler=draws), "valid", 0, 2, seed=3)
    assert isinstance(evaluated.sampler, UnpaddedDistributedSampler) and len(evaluated) == 50


def test_shard_loader_deals_a_batch_sampler_whole():
    batches = BatchSampler(SequentialSampler(range(20)), batch_size=3, drop_last=False)  # 7
    trained = [shard_loader(_loader(batch_sampler=batches), "train", r, 2, 0) for r in (0, 1)]
    assert all(isinstance(t.batch_sampler, DistributedBatchSamplerWrapper) for t in trained)
    got = [[b[0].tolist() for b in t] for t in trained]
    assert [len(g) for g in got] == [4, 4]
    assert sorted(x for g in got for b in g for x in b) == sorted([*range(20), 0, 1, 2])
    evaluated = [shard_loader(_loader(batch_sampler=batches), "valid", r, 2, 0) for r in (0, 1)]
    got = [[b[0].tolist() for b in e] for e in evaluated]
    assert sorted(b for g in got for b in g) == [
        list(range(i, min(i + 3, 20))) for i in range(0, 20, 3)
    ]


def test_shard_loader_leaves_self_sharding_parts_alone_and_warns_for_other_iterables():
    class Mine(RandomSampler):
        shards_by_rank = True

    data = TensorDataset(torch.arange(20))
    loader = _loader(batch_size=2, sampler=Mine(data))
    assert shard_loader(loader, "train", 0, 2, seed=0) is loader
    stream = _Stream(8, sized=False)
    stream.shards_by_rank = True
    iterable = DataLoader(stream, batch_size=2)
    assert shard_loader(iterable, "train", 1, 2, seed=0) is iterable
    plain = [[1, 2], [3, 4]]
    with pytest.warns(UserWarning, match="'train' is a list, not a torch DataLoader"):
        assert shard_loader(plain, "train", 0, 2, seed=0) is plain
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only rank 0 warns
        assert shard_loader(plain, "train", 1, 2, seed=0) is plain


def test_batch_sampler_wrapper_resumes_mid_epoch():
    batches = BatchSampler(RandomSampler(range(20)), batch_size=3, drop_last=False)
    full = DistributedBatchSamplerWrapper(batches, 2, 1, seed=5)
    full.set_epoch(2)
    expected = list(full)
    resumed = DistributedBatchSamplerWrapper(batches, 2, 1, seed=5)
    resumed.load_state_dict({"epoch": 2, "start_index": 1})
    resumed.set_epoch(2)
    assert len(resumed) == len(expected) - 1
    assert list(resumed) == expected[1:]
