from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from ddprun.data import (
    DistributedSamplerWrapper,
    ResumableDistributedSampler,
    UnpaddedDistributedSampler,
)


def _shards(make, world: int) -> list[list[int]]:
    return [list(make(rank)) for rank in range(world)]


# --- UnpaddedDistributedSampler -------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_unpadded_every_index_exactly_once(world):
    shards = _shards(lambda r: UnpaddedDistributedSampler(1001, world, r), world)
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(1001))
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1
    assert [len(UnpaddedDistributedSampler(1001, world, r)) for r in range(world)] == lengths
    # contiguous blocks, in rank order
    assert flat == list(range(1001))


def test_unpadded_more_ranks_than_items_and_dataset_argument():
    shards = _shards(lambda r: UnpaddedDistributedSampler(list("ab"), 3, r), 3)
    assert shards == [[0], [1], []]


def test_unpadded_keeps_a_user_sampler_order():
    order = [5, 3, 1, 0, 2, 4, 6]

    class Fixed(Sampler[int]):
        def __iter__(self):
            return iter(order)

        def __len__(self):
            return len(order)

    shards = _shards(lambda r: UnpaddedDistributedSampler(None, 2, r, sampler=Fixed()), 2)
    assert shards == [[5, 3, 1, 0], [2, 4, 6]]


def test_unpadded_random_inner_sampler_agrees_across_ranks():
    data = range(100)
    shards = _shards(
        lambda r: UnpaddedDistributedSampler(None, 3, r, sampler=RandomSampler(data)), 3
    )
    assert sorted(i for s in shards for i in s) == list(range(100))


def test_rank_validation():
    with pytest.raises(ValueError, match="rank"):
        UnpaddedDistributedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="num_replicas"):
        DistributedSamplerWrapper(SequentialSampler(range(3)), 0, 0)


# --- DistributedSamplerWrapper --------------------------------------------------------------


def _wrapper_shards(sampler, world, epoch, seed=0, drop_last=False):
    out = []
    for rank in range(world):
        wrapper = DistributedSamplerWrapper(sampler, world, rank, seed=seed, drop_last=drop_last)
        wrapper.set_epoch(epoch)
        out.append(list(wrapper))
    return out


def _interleave(shards: list[list[int]]) -> list[int]:
    return [i for group in zip(*shards) for i in group]


def test_wrapper_same_list_on_all_ranks_per_epoch():
    sampler = RandomSampler(range(40))
    first = _wrapper_shards(sampler, 2, epoch=1)
    # ranks that drew the same list take disjoint strides of a permutation
    assert sorted(_interleave(first)) == list(range(40))
    assert _wrapper_shards(sampler, 2, epoch=1) == first
    assert _wrapper_shards(sampler, 2, epoch=2) != first
    assert _wrapper_shards(sampler, 2, epoch=1, seed=7) != first


def test_wrapper_does_not_disturb_global_rng():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    _wrapper_shards(RandomSampler(range(10)), 2, epoch=0)
    assert torch.equal(torch.rand(3), expected)


def test_wrapper_restores_user_generator():
    generator = torch.Generator().manual_seed(1)
    sampler = RandomSampler(range(10), generator=generator)
    _wrapper_shards(sampler, 2, epoch=0)
    assert sampler.generator is generator


def test_wrapper_weighted_random_sampler():
    weights = [0.0] * 50 + [1.0] * 50  # only the second half can be drawn
    sampler = WeightedRandomSampler(weights, num_samples=101, replacement=True)
    shards = _wrapper_shards(sampler, 3, epoch=4)
    assert [len(s) for s in shards] == [34, 34, 34]  # padded to 102
    assert all(i >= 50 for s in shards for i in s)
    assert shards == _wrapper_shards(sampler, 3, epoch=4)
    dropped = _wrapper_shards(sampler, 3, epoch=4, drop_last=True)
    assert [len(s) for s in dropped] == [33, 33, 33]
    # one list shared by the ranks: shards interleave back into the first 99 draws
    assert _interleave(dropped) == _interleave(shards)[:99]


def test_wrapper_sampler_using_numpy_and_python_rngs():
    class NumpyShuffle(Sampler[int]):
        def __iter__(self):
            order = np.random.permutation(20).tolist()
            random.shuffle(order)
            return iter(order)

        def __len__(self):
            return 20

    shards = _wrapper_shards(NumpyShuffle(), 2, epoch=0)
    assert sorted(_interleave(shards)) == list(range(20))


def test_wrapper_padding_matches_torch_distributed_sampler():
    sampler = SequentialSampler(range(10))
    ours = _wrapper_shards(sampler, 4, epoch=0)
    theirs = [list(DistributedSampler(range(10), 4, r, shuffle=False)) for r in range(4)]
    assert ours == theirs


# --- ResumableDistributedSampler ------------------------------------------------------------


def test_resumable_matches_torch_and_agrees_across_ranks():
    data = range(23)
    for rank in range(2):
        ours = ResumableDistributedSampler(data, 2, rank, seed=5)
        theirs = DistributedSampler(data, 2, rank, seed=5)
        ours.set_epoch(3)
        theirs.set_epoch(3)
        assert list(ours) == list(theirs)
        assert len(ours) == len(theirs) == 12


@pytest.mark.parametrize(
    "make",
    [
        lambda: ResumableDistributedSampler(range(50), 2, 1, seed=3),
        lambda: DistributedSamplerWrapper(RandomSampler(range(50)), 2, 1, seed=3),
        lambda: UnpaddedDistributedSampler(51, 2, 1),
    ],
    ids=["resumable", "wrapper", "unpadded"],
)
def test_start_index_resume_yields_exactly_the_rest(make):
    sampler = make()
    sampler.set_epoch(2)
    full = list(sampler)
    consumed = iter(sampler)
    head = [next(consumed) for _ in range(7)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "start_index": 7} and head == full[:7]

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the runner re-announces the resumed epoch: position is kept
    assert len(resumed) == len(full) - 7
    assert list(resumed) == full[7:]
    assert list(resumed) == full  # the skip applies to one pass only
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a new epoch starts from its beginning
    assert len(list(resumed)) == len(full)


def test_state_dict_with_known_consumed_count_and_validation():
    sampler = ResumableDistributedSampler(range(10), 2, 0)
    assert sampler.state_dict(start_index=4) == {"epoch": 0, "start_index": 4}
    with pytest.raises(ValueError, match="outside"):
        sampler.load_state_dict({"epoch": 0, "start_index": 6})
    with pytest.raises(KeyError, match="start_index"):
        sampler.load_state_dict({"epoch": 0})


def test_resume_through_a_dataloader():
    data = list(range(40))
    sampler = ResumableDistributedSampler(data, 2, 0, seed=1)
    sampler.set_epoch(1)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    all_batches = [b.tolist() for b in loader]
    batches = iter(loader)
    next(batches), next(batches)
    state = sampler.state_dict()
    assert state["start_index"] == 8

    fresh = ResumableDistributedSampler(data, 2, 0, seed=1)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    resumed = DataLoader(data, batch_size=4, sampler=fresh)
    assert len(resumed) == 3
    assert [b.tolist() for b in resumed] == all_batches[2:]


def test_default_world_without_process_group():
    sampler = UnpaddedDistributedSampler(5)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert Counter(sampler) == Counter(range(5))
