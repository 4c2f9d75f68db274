"""Two nodes on one machine (two launchers over 127.0.0.1) train like one node of the same
world size; ranks follow the node ranks; only global rank 0 writes; SIGUSR1 saves and a
requeued run resumes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from ddprun.distributed import find_free_port

from .conftest import EPOCHS, Reference
from .helpers import (
    DDPRUN,
    RUN_NODE,
    SCRIPT,
    Nodes,
    checkpoint_files,
    csv_rows,
    node_env,
    progress,
    read_rank,
    run_node_env,
    wait_until,
    weights,
)


@pytest.mark.timeout(120)
def test_two_nodes_match_one_node_and_only_rank0_of_node0_writes(
    tmp_path: Path, reference: Reference
) -> None:
    port = find_free_port()
    shared, out = tmp_path / "shared", tmp_path / "out"
    # Node 1 gets its own --logdir: anything a rank of node 1 wrote would land there. Node 1
    # is started first, so with torch's own ordering (by agent pid) it would be group 0.
    logdirs = {0: shared, 1: tmp_path / "node1-private"}
    with Nodes(tmp_path) as nodes:
        for node_rank in (1, 0):
            nodes.start(
                f"node{node_rank}",
                ["bash", RUN_NODE, SCRIPT, "--logdir", logdirs[node_rank], "--out", out,
                 "--epochs", str(EPOCHS)],
                env=run_node_env(port, node_rank, DDPRUN_LOGDIR=str(tmp_path / f"l{node_rank}")),
            )  # fmt: skip
            time.sleep(0.5)
        codes = [node.wait(90) for node in nodes.nodes]
        assert codes == [0, 0], nodes.output
        assert wait_until(lambda: nodes.workers() == [], 10), nodes.workers()

    for node_rank in (0, 1):
        info = read_rank(out, node_rank)
        expected = {"RANK": str(node_rank), "GROUP_RANK": str(node_rank), "LOCAL_RANK": "0",
                    "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
        assert {key: info[key] for key in expected} == expected, info
        # global rank r ran on node r: its launcher wrote rank<r>.log, and only that
        assert [p.name for p in (tmp_path / f"l{node_rank}" / "ranks").iterdir()] == [
            f"rank{node_rank}.log"
        ]
        assert weights(out, node_rank) == weights(reference.out, node_rank)
    assert checkpoint_files(shared) == checkpoint_files(reference.logdir)
    assert csv_rows(shared) == csv_rows(reference.logdir)  # each epoch's row once
    assert len(csv_rows(shared)) == EPOCHS
    assert not logdirs[1].exists(), sorted(logdirs[1].rglob("*"))


@pytest.mark.timeout(120)
def test_sigusr1_saves_last_pth_and_a_requeued_run_resumes(
    tmp_path: Path, reference: Reference
) -> None:
    logdir, out = tmp_path / "run", tmp_path / "out"
    args = [SCRIPT, "--logdir", logdir, "--out", out, "--epochs", str(EPOCHS)]
    launcher = [*DDPRUN, "--nproc", "2", "--logdir", tmp_path / "launcher"]
    with Nodes(tmp_path) as nodes:
        first = nodes.start("first", [*launcher, *args, "--batch-sleep", "0.05"], env=node_env())
        assert wait_until(lambda: progress(out) >= 3, 60), nodes.output
        first.process.send_signal(signal.SIGUSR1)  # SLURM's "time limit soon" warning
        assert first.wait(30) == 128 + signal.SIGUSR1, nodes.output
        assert "stopped by SIGUSR1" in first.output
        assert wait_until(lambda: nodes.workers() == [], 10), nodes.workers()
        assert (logdir / "checkpoints" / "last.pth").is_file()
        assert "weights" not in read_rank(out, 0)  # stopped before the end

        # The requeued job: a fresh ddprun whose environment says SLURM restarted the job.
        again = nodes.start("requeued", [*launcher, *args], env=node_env(SLURM_RESTART_COUNT="1"))
        assert again.wait(90) == 0, nodes.output
    assert "resuming from" in again.output
    for rank in (0, 1):
        assert read_rank(out, rank)["TORCHELASTIC_RESTART_COUNT"] == "1"
        assert weights(out, rank) == weights(reference.out, rank)
    assert csv_rows(logdir) == csv_rows(reference.logdir)
