"""Unit tests of the multi-node settings and ddprun's rendezvous agreement (no processes)."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousInfo

from ddprun.launch.agent import launch_config_values
from ddprun.launch.cli import UsageError, build_settings
from ddprun.launch.rendezvous import (
    RESTART_COUNT_ENV,
    FreshWorkerStoreRendezvous,
    _create_rendezvous,
)
from ddprun.launch.settings import NODE_RANK_CONFIG

SLURM = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
         "SLURM_JOB_NODELIST": "node[07-08]"}  # fmt: skip


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


@pytest.mark.timeout(10)
def test_a_given_node_rank_of_a_fixed_size_job_is_kept(script: str) -> None:
    static = ["--nproc", "1", "--nnodes", "2", "--master-addr", "h", "--master-port", "9"]
    given = build_settings([*static, "--node-rank", "1", script], {})
    assert given.fixed_node_rank == 1
    assert given.rendezvous().configs[NODE_RANK_CONFIG] == 1
    assert build_settings([*static, script], {"DDPRUN_NODE_RANK": "0"}).fixed_node_rank == 0
    from_slurm = build_settings(["--nproc", "1", script], SLURM)
    assert from_slurm.fixed_node_rank == 1 and from_slurm.master_addr == "node07"
    # no node rank given, an elastic job, one node: the rendezvous orders the nodes
    assert build_settings([*static, script], {}).fixed_node_rank is None
    elastic = ["--nnodes", "1:2", "--rdzv-endpoint", "h:9", "--node-rank", "1", script]
    assert build_settings(elastic, {}).fixed_node_rank is None
    assert NODE_RANK_CONFIG not in build_settings([script], {}).rendezvous().configs


@pytest.mark.timeout(10)
def test_rdzv_timeout_flag_and_sigusr1_forwarding(script: str, tmp_path: Path) -> None:
    settings = build_settings(["--rdzv-timeout", "42", script], {})
    assert settings.rendezvous().configs["join_timeout"] == 42
    assert build_settings([script], {"DDPRUN_RDZV_TIMEOUT": "7"}).rdzv_timeout == 7
    with pytest.raises(UsageError, match="--rdzv-timeout must be an integer >= 1"):
        build_settings(["--rdzv-timeout", "0", script], {})
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

    values = launch_config_values(settings, DefaultLogsSpecs(log_dir=str(tmp_path)))
    assert "SIGUSR1" in values["signals_to_handle"].split(",")  # forwarded like SIGTERM


class _Inner:
    """Stands in for torch's c10d handler: hands out a fixed round."""

    use_agent_store = True

    def __init__(self, store: dist.Store, rank: int, world_size: int) -> None:
        self.info = RendezvousInfo(store, rank, world_size, None)  # type: ignore[arg-type]

    def next_rendezvous(self) -> RendezvousInfo:
        return self.info


def _round(node_ranks: list[int | None], earlier_rounds: list[int]) -> list:
    """One rendezvous round of len(node_ranks) nodes sharing a store, in threads; returns
    each node's RendezvousInfo or the exception it raised."""
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=5))
    results: list = [None] * len(node_ranks)

    def node(rdzv_rank: int) -> None:
        handler = FreshWorkerStoreRendezvous(
            _Inner(dist.PrefixStore("round", store), rdzv_rank, len(node_ranks)),  # type: ignore[arg-type]
            node_ranks[rdzv_rank],
        )
        handler._rounds = earlier_rounds[rdzv_rank]
        try:
            results[rdzv_rank] = handler.next_rendezvous()
        except Exception as exc:
            results[rdzv_rank] = exc

    threads = [threading.Thread(target=node, args=(rank,)) for rank in range(len(node_ranks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


@pytest.mark.timeout(30)
def test_nodes_get_their_node_rank_as_group_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESTART_COUNT_ENV, raising=False)
    # the rendezvous ordered them 0, 1, 2; their node ranks are 2, 0, 1
    infos = _round([2, 0, 1], [0, 0, 0])
    assert [info.rank for info in infos] == [2, 0, 1]
    assert all(info.world_size == 3 for info in infos)
    assert os.environ[RESTART_COUNT_ENV] == "0"


@pytest.mark.timeout(30)
def test_two_nodes_with_one_node_rank_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESTART_COUNT_ENV, raising=False)
    results = _round([1, 1], [0, 0])
    for result in results:
        assert isinstance(result, RendezvousError)
        assert "each node needs its own --node-rank in 0..1" in str(result)


@pytest.mark.timeout(30)
def test_a_rejoining_node_learns_the_job_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESTART_COUNT_ENV, raising=False)
    # node 0 ran two rounds already; node 1 is a replacement that never ran
    infos = _round([None, None], [2, 0])
    assert [info.rank for info in infos] == [0, 1]  # no fixed ranks: the rendezvous order
    assert os.environ[RESTART_COUNT_ENV] == "2"


@pytest.mark.timeout(10)
def test_the_node_rank_reaches_ddpruns_rendezvous_handler() -> None:
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    params = RendezvousParameters("ddprun-c10d", "127.0.0.1:0", "unit", 1, 1, "127.0.0.1",
                                  is_host=True, **{NODE_RANK_CONFIG: 0})  # fmt: skip
    handler = _create_rendezvous(params)
    try:
        assert isinstance(handler, FreshWorkerStoreRendezvous) and handler._node_rank == 0
    finally:
        handler.shutdown()


@pytest.mark.timeout(10)
def test_worker_adopts_the_job_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddprun.launch.worker import _adopt_job_restart_count

    cases = [
        ({"TORCHELASTIC_RESTART_COUNT": "0", RESTART_COUNT_ENV: "1"}, "1"),
        ({"TORCHELASTIC_RESTART_COUNT": "2", RESTART_COUNT_ENV: "1"}, "2"),
        ({"TORCHELASTIC_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": "3"}, "3"),
        ({"TORCHELASTIC_RESTART_COUNT": "0", RESTART_COUNT_ENV: "0"}, "0"),
    ]
    for env, expected in cases:
        for name in ("TORCHELASTIC_RESTART_COUNT", RESTART_COUNT_ENV, "SLURM_RESTART_COUNT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        _adopt_job_restart_count()
        assert os.environ["TORCHELASTIC_RESTART_COUNT"] == expected, env
