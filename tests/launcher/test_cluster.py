"""SLURM detection: node-list expansion and the settings derived from SLURM variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddprun.launch.cli import UsageError, build_settings
from ddprun.launch.cluster import ClusterError, detect_cluster, expand_nodelist, first_host


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu-[001-003]-ib", ["gpu-001-ib", "gpu-002-ib", "gpu-003-ib"]),
        ("single-host", ["single-host"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]c[1-2]", ["r1c1", "r1c2", "r2c1", "r2c2"]),
        ("x1,y[5],z", ["x1", "y5", "z"]),
        ("host-1.example.org", ["host-1.example.org"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("a[01-02],b[5,7-8]", ["a01", "a02", "b5", "b7", "b8"]),
        ("n-[001-003]-ib,x", ["n-001-ib", "n-002-ib", "n-003-ib", "x"]),
        ("gpu[0009-0011]", ["gpu0009", "gpu0010", "gpu0011"]),  # padding kept across digits
        ("c[7,010-011]", ["c7", "c010", "c011"]),  # each range keeps its own padding
        (" node[1-2] ", ["node1", "node2"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bad", ["", "node[1-", "node]1[", "node[a-b]", "node[3-1]", "node[]"])
def test_malformed_nodelists_raise(bad: str) -> None:
    with pytest.raises(ClusterError):
        expand_nodelist(bad)


def _slurm(**extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
           "SLURM_JOB_NODELIST": "gpu-[007-010]-ib", "SLURM_NTASKS": "4"}  # fmt: skip
    env.update(extra)
    return env


@pytest.mark.timeout(10)
def test_detect_slurm() -> None:
    info = detect_cluster(_slurm())
    assert info is not None
    assert (info.nnodes, info.node_rank, info.master_addr, info.job_id) == (
        4,
        2,
        "gpu-007-ib",
        "4242",
    )
    assert 1 <= info.master_port <= 65535
    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "1"}) is None  # no node list: not enough to go on


@pytest.mark.timeout(10)
def test_one_task_per_node_is_required_inside_an_srun_step() -> None:
    with pytest.raises(ClusterError, match="--ntasks-per-node=1"):
        detect_cluster(_slurm(SLURM_STEP_ID="0", SLURM_NTASKS="16"))
    assert detect_cluster(_slurm(SLURM_STEP_ID="0")) is not None


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


@pytest.mark.timeout(10)
def test_settings_come_from_slurm(script: str) -> None:
    settings = build_settings(["--nproc", "2", script], _slurm())
    assert (settings.min_nodes, settings.max_nodes, settings.node_rank) == (4, 4, 2)
    assert settings.master_addr == "gpu-007-ib"
    assert settings.run_id == "4242"
    rdzv = settings.rendezvous()
    assert rdzv.endpoint.startswith("gpu-007-ib:")
    assert rdzv.configs["is_host"] is False  # SLURM node 0 (the first host) hosts it


@pytest.mark.timeout(10)
def test_flags_override_slurm(script: str) -> None:
    settings = build_settings(
        [
            "--nproc",
            "2",
            "--nnodes",
            "4",
            "--node-rank",
            "0",
            "--master-addr",
            "head",
            "--master-port",
            "2000",
            script,
        ],
        _slurm(),
    )
    assert settings.node_rank == 0
    assert settings.rendezvous().endpoint == "head:2000"
    single = build_settings(["--nproc", "2", "--nnodes", "1", script], _slurm())
    assert single.rendezvous().endpoint == "127.0.0.1:0"  # one node: SLURM's master is not needed


@pytest.mark.timeout(10)
def test_bad_slurm_variables_are_usage_errors(script: str) -> None:
    with pytest.raises(UsageError, match="SLURM_NODEID"):
        build_settings(["--nproc", "2", script], _slurm(SLURM_NODEID="9"))
