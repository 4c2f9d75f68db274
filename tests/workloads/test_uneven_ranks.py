"""A rank with nothing to do, keys only some ranks log, and per-rank epoch seeds (issue 10,
items 2, 3 and 12), with real processes compared with one process."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.workloads.helpers import assert_metrics_close, ddprun, load_metrics, run, script

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = run(script("uneven_ranks", "--out", str(out)), cwd=out)
    assert result.returncode == 0, result.stderr
    return load_metrics(out)


@pytest.mark.parametrize("launch", ["ddprun2", "spawn3"])
def test_empty_ranks_and_partial_keys_match_one_process(tmp_path, single, launch):
    if launch == "ddprun2":
        argv, world = ddprun(2, "uneven_ranks", "--out", str(tmp_path), "--ddp"), 2
    else:
        argv, world = (
            script("uneven_ranks", "--out", str(tmp_path), "--ddp", "--world-size", "3"),
            3,
        )
    result = run(argv, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    multi = load_metrics(tmp_path)
    assert multi["world"] == world
    # "tiny" has one sample: every rank but one ran no batch; "valid" logs `rare` on rank 0's
    # block only and `late` on the last rank's block only
    assert_metrics_close(single, multi, loaders=("valid", "tiny"), tol=1e-6)
    assert multi["epoch_metrics"]["valid"]["late"] == pytest.approx(9.5)
    # logged by the last rank only: the mean over the batches that reported it
    assert multi["epoch_metrics"]["train"]["rank_only"] == pytest.approx(5.0)
    assert "rank_only" not in single["epoch_metrics"]["train"]
    seeds = [json.loads((tmp_path / f"seeds_rank{r}.json").read_text()) for r in range(world)]
    flat = list(itertools.chain.from_iterable(seeds))
    assert len(flat) == 3 * world and len(set(flat)) == len(flat), seeds


def test_epoch_seeds_never_coincide_across_ranks_and_epochs():
    from ddprun.core.runner import epoch_seed

    class World:
        def __init__(self, rank, world_size):
            self.rank, self.world_size = rank, world_size

    for world_size in (1, 2, 3, 8):
        seeds = [
            epoch_seed(42, epoch, World(rank, world_size))
            for epoch in range(1, 50)
            for rank in range(world_size)
        ]
        assert len(set(seeds)) == len(seeds)
    assert epoch_seed(42, 5, World(-1, 1)) == 47  # one process: seed + epoch, as before
