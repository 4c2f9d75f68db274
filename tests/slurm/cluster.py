"""A real, throw-away SLURM cluster on this machine: munged, slurmctld and one or two slurmd.

Everything lives in one temporary folder (key, sockets, state, spool, logs, slurm.conf) and
uses free ports, so the system's own SLURM or munge (if any) is neither used nor disturbed.
Two nodes are simulated with two slurmd processes (``slurmd -N NAME``, each on its own port).
When two names of this machine resolve to one of its addresses, the nodes carry those names
and ddprun takes the master address from SLURM_JOB_NODELIST as on a real cluster; otherwise
the nodes get made-up names with NodeAddr=127.0.0.1 and jobs are given
DDPRUN_MASTER_ADDR=127.0.0.1.

`start_cluster` returns a `SlurmCluster`; `SlurmCluster.stop` cancels every job, stops the
daemons (their process groups) and kills any process left that belongs to this cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.launcher.helpers import wait_until

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "ci" / "install_slurm.sh"


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def try_install(timeout: float = 600) -> str:
    """Run ci/install_slurm.sh once; return its output (it never raises on failure)."""
    if not INSTALL_SCRIPT.is_file():
        return f"{INSTALL_SCRIPT} not found"
    try:
        result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"install_slurm.sh did not finish: {exc}"
    return (result.stdout + result.stderr)[-2000:]


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _local_addresses() -> set[str]:
    return {
        address.address.split("%")[0]
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family in (socket.AF_INET, socket.AF_INET6)
    }


def _hosts_file_names() -> list[str]:
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return []
    return [name for line in lines for name in line.split("#")[0].split()[1:]]


def local_node_names(count: int = 2) -> list[str]:
    """Up to `count` short names (not "localhost", special to SLURM) of this machine."""
    local = _local_addresses()
    names: list[str] = []
    for name in [socket.gethostname(), *_hosts_file_names()]:
        if not name or name == "localhost" or "." in name or name in names:
            continue
        try:
            resolved = {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            continue
        if resolved & local:
            names.append(name)
    return names[:count]


@dataclass
class SlurmCluster:
    """A running test cluster."""

    folder: Path
    conf: Path
    nodes: list[str]
    names_resolve: bool  # False: made-up node names, jobs need DDPRUN_MASTER_ADDR
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for SLURM commands (and the jobs they submit)."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SLURM_", "DDPRUN_", "TORCHELASTIC_"))
            and key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        env["SLURM_CONF"] = str(self.conf)
        if not self.names_resolve:
            env["DDPRUN_MASTER_ADDR"] = "127.0.0.1"
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 30, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env=self.env(**extra))  # fmt: skip

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job reaches a final state; return its info."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in final:
                return info
            time.sleep(0.5)
        return info

    def logs(self) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def _own_processes(self) -> list[psutil.Process]:
        """Processes of this cluster's jobs: SLURM_CONF or the folder in their environment or
        command line (slurmstepd, the batch shell, srun, ddprun and its workers)."""
        found = []
        marker = str(self.folder)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == os.getpid():
                continue
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                if marker in cmdline or proc.environ().get("SLURM_CONF") == str(self.conf):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, kill whatever of this cluster is left."""
        try:
            self.run("scancel", "--full", "--user", str(os.getuid()), timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", "-o", "%i", timeout=10)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        for proc in self._own_processes():
            try:
                proc.kill()
            except psutil.Error:
                pass

    def leftover_processes(self) -> list[psutil.Process]:
        return self._own_processes()


def _write_conf(folder: Path, nodes: list[str], resolve: bool, ports: list[int]) -> Path:
    ctld_port, *node_ports = ports
    lines = [
        "ClusterName=ddprun-test",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}/%n",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder}/slurmd-%n.pid",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'log'}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "KillWait=5",
        "MinJobAge=300",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
    ]
    for index, (name, port) in enumerate(zip(nodes, node_ports)):
        # NodeHostname must differ per node for several slurmd on one host; slurmd -N picks
        # the node, so the value itself is never resolved.
        lines.append(
            f"NodeName={name} NodeHostname=ddprun-test-host-{index} NodeAddr=127.0.0.1 "
            f"Port={port} CPUs=2 State=UNKNOWN"
        )
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip


def start_cluster(folder: Path, nodes: int = 2) -> SlurmCluster:
    """Start munged, slurmctld and `nodes` slurmd in `folder`; wait until the nodes are idle.

    Raises:
        RuntimeError: a daemon did not come up (the message holds their logs).
    """
    for sub in ("munge", "state", "log", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "munge").chmod(0o700)
    names = local_node_names(nodes)
    resolve = len(names) == nodes
    if not resolve:
        names = [f"ddprun-node{index}" for index in range(nodes)]
    for name in names:
        (folder / "spool" / name).mkdir(exist_ok=True)
    conf = _write_conf(folder, names, resolve, _free_ports(1 + nodes))
    cluster = SlurmCluster(folder, conf, names, resolve)
    env = cluster.env()
    try:
        key = folder / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True,
                       capture_output=True, timeout=30)  # fmt: skip
        key.chmod(0o600)
        socket_path = folder / "munge" / "munge.socket"
        munged = [
            "munged", "--foreground", "--force", f"--key-file={key}",
            f"--socket={socket_path}", f"--pid-file={folder / 'munge' / 'munged.pid'}",
            f"--seed-file={folder / 'munge' / 'munged.seed'}",
        ]  # fmt: skip
        cluster.processes.append(_spawn(munged, folder / "log" / "munged.log", env))
        if not wait_until(socket_path.exists, 10):
            raise RuntimeError("munged did not create its socket")
        ctld = ["slurmctld", "-D", "-i", "-f", str(conf)]
        cluster.processes.append(_spawn(ctld, folder / "log" / "slurmctld.out.log", env))
        if not wait_until(lambda: cluster.run("scontrol", "ping", timeout=10).returncode == 0, 20):
            raise RuntimeError("slurmctld does not answer")
        for name in names:
            slurmd = ["slurmd", "-D", "-f", str(conf), "-N", name]
            cluster.processes.append(_spawn(slurmd, folder / "log" / f"slurmd-{name}.out.log", env))

        def all_idle() -> bool:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=10).stdout.split()
            return states.count("idle") == nodes

        if not wait_until(all_idle, 30, 0.5):
            raise RuntimeError("the slurmd nodes did not become idle")
    except Exception as exc:
        logs = cluster.logs()
        cluster.stop()
        raise RuntimeError(f"could not start the test SLURM cluster: {exc}\n{logs}") from exc
    return cluster
