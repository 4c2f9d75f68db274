"""A whole node (its launcher and workers) dies mid-run: the job resumes when the node comes
back, ends cleanly when it does not, and never hangs; no worker survives."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ddprun.distributed import find_free_port

from .conftest import EPOCHS, Reference
from .helpers import (
    DDPRUN,
    SCRIPT,
    Nodes,
    csv_rows,
    node_env,
    progress,
    read_rank,
    wait_until,
    weights,
)


def _node_argv(tmp_path: Path, port: int, node_rank: int, *extra: str, name: str = "") -> list:
    """One node of a 2-node x 1-process job that can restart its workers once."""
    return [
        *DDPRUN, "--nnodes", "2", "--node-rank", str(node_rank), "--nproc", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "1",
        *extra, "--logdir", tmp_path / f"launcher-{name or node_rank}",
        SCRIPT, "--logdir", tmp_path / "run", "--out", tmp_path / "out",
        "--epochs", str(EPOCHS), "--batch-sleep", "0.04",
    ]  # fmt: skip


def _start_pair(nodes: Nodes, tmp_path: Path, port: int, *extra: str) -> list:
    started = [nodes.start(f"node{rank}", _node_argv(tmp_path, port, rank, *extra),
                           env=node_env()) for rank in (0, 1)]  # fmt: skip
    # 32 batches per epoch: batch 40 is inside epoch 2, after epoch 1's last.pth
    assert wait_until(lambda: progress(tmp_path / "out") >= 40, 60), nodes.output
    return started


@pytest.mark.timeout(150)
def test_killed_node_rejoins_and_the_job_resumes_with_the_same_weights(
    tmp_path: Path, reference: Reference
) -> None:
    port = find_free_port()
    with Nodes(tmp_path) as nodes:
        node0, node1 = _start_pair(nodes, tmp_path, port)
        node1.kill_node()  # launcher and workers, at once
        # node 0's worker fails on the lost peer; its agent restarts it and waits for node 1
        assert wait_until(lambda: len(nodes.workers()) <= 1, 20), nodes.workers()
        time.sleep(1)
        assert node0.process.poll() is None, nodes.output
        # the scheduler brings node 1 back: a fresh launcher with the same command
        back = nodes.start("node1-back", _node_argv(tmp_path, port, 1, name="1-back"),
                           env=node_env())  # fmt: skip
        assert node0.wait(100) == 0, nodes.output
        assert back.wait(30) == 0, nodes.output
        assert wait_until(lambda: nodes.workers() == [], 10), nodes.workers()
    assert "restarting all of them" in node0.output and "resuming from" in node0.output
    for rank in (0, 1):
        # node 1's fresh launcher knows the job restarted: its worker resumed too
        assert read_rank(tmp_path / "out", rank)["TORCHELASTIC_RESTART_COUNT"] == "1"
        assert weights(tmp_path / "out", rank) == weights(reference.out, rank)
    assert csv_rows(tmp_path / "run") == csv_rows(reference.logdir)


@pytest.mark.timeout(90)
def test_killed_master_node_ends_the_job_at_once(tmp_path: Path) -> None:
    with Nodes(tmp_path) as nodes:
        node0, node1 = _start_pair(nodes, tmp_path, find_free_port())
        start = time.monotonic()
        node0.kill_node()  # it hosted the rendezvous: nothing to restart against
        assert node1.wait(30) == 1, nodes.output
        assert time.monotonic() - start < 30
        assert wait_until(lambda: nodes.workers() == [], 10), nodes.workers()
    assert "is node 0's launcher up?" in node1.output
    assert "Traceback" not in node1.output and "TCPStore.cpp" not in node1.output


@pytest.mark.timeout(90)
def test_lost_node_that_never_returns_ends_the_job_after_the_rdzv_timeout(
    tmp_path: Path,
) -> None:
    with Nodes(tmp_path) as nodes:
        node0, node1 = _start_pair(nodes, tmp_path, find_free_port(), "--rdzv-timeout", "5")
        start = time.monotonic()
        node1.kill_node()
        assert node0.wait(45) == 1, nodes.output
        assert time.monotonic() - start < 45
        assert wait_until(lambda: nodes.workers() == [], 10), nodes.workers()
    assert "fewer than 2 nodes joined" in node0.output and "--rdzv-timeout" in node0.output
