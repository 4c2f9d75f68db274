"""launcher/slurm/train.sbatch on a real SLURM cluster started on this machine (two slurmd
nodes, see cluster.py): `srun ddprun` takes nodes, node rank and master address from the
allocation; SIGUSR1 before the time limit saves last.pth, requeues, and the requeued job
resumes to the same weights.

Needs root (slurmd starts the jobs) and the slurm-wlm and munge packages; without them the
fixture runs ci/install_slurm.sh once (not with DDPRUN_SLURM_AUTO_INSTALL=0) and skips,
saying why, only if that did not help.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddprun.launch.cluster import first_host
from tests.launcher.helpers import worker_processes

from .cluster import SlurmCluster, missing_binaries, start_cluster, try_install

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launcher" / "slurm" / "train.sbatch"
SCRIPT = ROOT / "tests" / "multinode" / "scripts" / "train_linear.py"
EPOCHS = 3
# install (bounded by try_install) + cluster start + the jobs
SETUP_TIMEOUT = 900


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if not hasattr(os, "geteuid"):
        pytest.skip("SLURM tests need a POSIX system")
    if missing_binaries():
        if os.environ.get("DDPRUN_SLURM_AUTO_INSTALL", "1") == "0":
            pytest.skip(f"SLURM not installed ({', '.join(missing_binaries())} missing) and "
                        "DDPRUN_SLURM_AUTO_INSTALL=0")  # fmt: skip
        output = try_install()
        still = missing_binaries()
        if still:
            last = output.strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"SLURM not available: {', '.join(still)} missing and ci/install_slurm.sh "
                        f"could not install slurm-wlm/munge ({last[0]})")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("SLURM tests run slurmd, which must be root to start jobs")
    folder = tmp_path_factory.mktemp("slurm")
    slurm = start_cluster(folder, nodes=2)  # raises (test error) if the daemons do not start
    try:
        yield slurm
    finally:
        slurm.stop()
    assert slurm.leftover_processes() == []


@dataclass
class Job:
    job_id: str
    folder: Path
    info: dict[str, str]

    @property
    def output(self) -> str:
        path = self.folder / f"job-{self.job_id}.out"
        return path.read_text(errors="replace") if path.exists() else "(no job output)"

    @property
    def logdir(self) -> Path:
        return self.folder / "run"

    def rank(self, rank: int) -> dict:
        return json.loads((self.logdir / "final" / f"rank{rank}.json").read_text())


def _job_env(slurm: SlurmCluster) -> dict[str, str]:
    """The submitting shell's environment: this Python's ddprun first on PATH, 1 worker per
    node (2 nodes: world size 2, as in the multi-node tests), torch's agent logs at INFO so
    the job output shows the rendezvous endpoint ddprun derived from the allocation."""
    scripts = sysconfig.get_path("scripts")
    path = os.pathsep.join([scripts, os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    extra = {"PATH": path, "DDPRUN_NPROC": "1", "DDPRUN_LOG_LEVEL": "INFO",
             "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    if shutil.which("ddprun", path=path) is None:
        extra["DDPRUN_CMD"] = f"{sys.executable} -m ddprun"
    return slurm.env(**extra)


def _submit(slurm: SlurmCluster, folder: Path, *script_args: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["sbatch", "--parsable", "--nodes=2", f"--output={folder}/job-%j.out",
            f"--chdir={folder}", str(SBATCH), str(SCRIPT), "--logdir", str(folder / "run"),
            "--epochs", str(EPOCHS), *script_args]  # fmt: skip
    result = slurm.run(*argv, **_job_env(slurm))
    assert result.returncode == 0, result.stderr + slurm.logs()
    return result.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def finished_job(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """The recipe run to completion on 2 nodes."""
    folder = tmp_path_factory.mktemp("plain-job")
    job_id = _submit(cluster, folder)
    info = cluster.wait_for_job(job_id, 120)
    return Job(job_id, folder, info)


@pytest.mark.timeout(SETUP_TIMEOUT)
def test_srun_ddprun_takes_nodes_rank_and_master_from_the_allocation(
    cluster: SlurmCluster, finished_job: Job
) -> None:
    job = finished_job
    context = f"{job.info}\n{job.output}\n{cluster.logs()}"
    assert job.info.get("JobState") == "COMPLETED" and job.info.get("ExitCode") == "0:0", context
    # ddprun's rendezvous: the first host of SLURM's node list (or the DDPRUN_MASTER_ADDR twin
    # where the node names are made up) and the job id
    master = first_host(job.info["NodeList"]) if cluster.names_resolve else "127.0.0.1"
    assert f"rdzv_endpoint            : {master}:" in job.output, context
    assert f"run_id                   : {job.job_id}" in job.output, context
    for rank in (0, 1):
        info = job.rank(rank)
        assert info["SLURM_JOB_ID"] == job.job_id
        assert info["WORLD_SIZE"] == "2" and info["LOCAL_RANK"] == "0"
        # node rank from SLURM_NODEID, kept as group rank: rank 0 runs on SLURM node 0
        assert info["GROUP_RANK"] == info["SLURM_NODEID"] == str(rank), info
    assert job.rank(0)["weights"] == job.rank(1)["weights"]
    files = sorted(p.name for p in (job.logdir / "checkpoints").iterdir())
    assert files[:3] == ["_metrics.json", "best.pth", "last.pth"], files  # no temporary files
    assert len(files) == 4 and files[3].startswith("train."), files  # save_n_best=1
    rows = (job.logdir / "logs" / "train.csv").read_text().splitlines()[1:]
    assert len(rows) == EPOCHS, rows  # one row per epoch: written once, by rank 0
    assert worker_processes(str(job.folder)) == []


@pytest.mark.timeout(SETUP_TIMEOUT)
def test_sigusr1_saves_requeues_and_the_job_resumes(
    cluster: SlurmCluster, finished_job: Job, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("requeued-job")
    job_id = _submit(cluster, folder, "--batch-sleep", "0.05")
    job = Job(job_id, folder, {})
    progress = job.logdir / "final" / "progress"

    def step() -> int:
        try:
            return int(progress.read_text() or 0)
        except (OSError, ValueError):
            return 0

    deadline = time.monotonic() + 90
    while step() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert step() >= 3, f"{cluster.job_info(job_id)}\n{job.output}\n{cluster.logs()}"
    # What --signal=B:USR1@120 does before the time limit: SIGUSR1 to the batch shell only.
    signal = cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    assert signal.returncode == 0, signal.stderr
    # SLURM holds a requeued job back for a while (BeginTime); let it start again at once.
    deadline, released = time.monotonic() + 120, False
    pending_since: float | None = None
    while time.monotonic() < deadline:
        job.info = cluster.job_info(job_id)
        state, restarts = job.info.get("JobState"), job.info.get("Restarts")
        if state == "PENDING" and restarts == "1" and pending_since is None:
            pending_since = time.monotonic()
        waited = pending_since is not None and time.monotonic() - pending_since > 2.0
        if not released and waited and _nodes_idle(cluster):
            # Not at once: slurmd revokes the first run's credential at the requeue, and refuses
            # a new one issued within the same second ("Job credential revoked"); SLURM's own
            # requeue delay avoids that, this release must too.
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            released = True
        if job.info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.5)
    context = f"{job.info}\n{job.output}\n{cluster.logs()}"
    assert job.info.get("JobState") == "COMPLETED" and job.info.get("Restarts") == "1", context
    output = job.output
    assert "got SIGUSR1" in output and "stopped by SIGUSR1" in output, context
    assert f"requeueing job {job_id}" in output and "restart 1)" in output, context
    assert "resuming from" in output, context
    for rank in (0, 1):  # stopped mid-epoch, resumed: the uninterrupted job's weights
        assert job.rank(rank)["TORCHELASTIC_RESTART_COUNT"] == "1"
        assert job.rank(rank)["weights"] == finished_job.rank(rank)["weights"]
    rows = (job.logdir / "logs" / "train.csv").read_text().splitlines()
    assert rows == (finished_job.logdir / "logs" / "train.csv").read_text().splitlines()
    assert worker_processes(str(folder)) == []


def _nodes_idle(cluster: SlurmCluster) -> bool:
    """Whether every node of the test cluster reports idle (no job running or completing)."""
    states = cluster.run("sinfo", "-h", "-N", "-o", "%T", timeout=10).stdout.split()
    return bool(states) and all(state == "idle" for state in states)
