"""Helpers for multi-node tests: several "nodes" (launchers) on one machine over 127.0.0.1.

Every node is started in its own session with its output in files; `Nodes` kills every
launcher's process group and every worker whose command line mentions the test's folder,
whatever happens in the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from tests.launcher.helpers import clean_env, wait_until, worker_processes  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "multinode" / "scripts" / "train_linear.py"
RUN_NODE = ROOT / "launcher" / "multinode" / "run_node.sh"
DDPRUN = [sys.executable, "-m", "ddprun"]


class Node:
    """One launcher process (a "node"), started in its own session."""

    def __init__(self, folder: Path, name: str, argv: Sequence[str | Path],
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:  # fmt: skip
        self.name = name
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(
                [str(arg) for arg in argv], cwd=cwd or folder, env=env or clean_env(),
                stdout=out, stderr=err, text=True, start_new_session=True,
            )  # fmt: skip
        self.started = time.monotonic()

    @property
    def output(self) -> str:
        return f"[{self.name} out]\n{self.out_path.read_text()}[{self.name} err]\n" + (
            self.err_path.read_text()
        )

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the launcher still runs after `timeout` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_node(self) -> None:
        """SIGKILL the launcher's whole process group: the node is gone at once."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


class Nodes:
    """The nodes of one test; a context manager that always cleans up."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nodes: list[Node] = []

    def start(self, name: str, argv: Sequence[str | Path], **kwargs) -> Node:
        node = Node(self.folder, name, argv, **kwargs)
        self.nodes.append(node)
        return node

    def workers(self) -> list[psutil.Process]:
        return worker_processes(str(self.folder))

    @property
    def output(self) -> str:
        return "\n".join(node.output for node in self.nodes)

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.kill_node()
        for worker in self.workers():
            try:
                os.killpg(worker.pid, signal.SIGKILL)  # each worker leads its own session
            except (ProcessLookupError, PermissionError):
                pass


def node_env(**extra: str) -> dict[str, str]:
    """A clean environment (no launcher or SLURM variables) plus `extra`."""
    return clean_env(PYTHONUNBUFFERED="1", **extra)


def run_node_env(master_port: int, node_rank: int, **extra: str) -> dict[str, str]:
    """The environment launcher/multinode/run_node.sh expects, for a 2-node job on loopback."""
    return node_env(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), NNODES="2",
        NODE_RANK=str(node_rank), NPROC="1", DDPRUN_CMD=f"{sys.executable} -m ddprun", **extra,
    )  # fmt: skip


def read_rank(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def weights(out: Path, rank: int) -> dict:
    return read_rank(out, rank)["weights"]


def progress(out: Path) -> int:
    """Rank 0's global batch step (written with --batch-sleep), 0 before the first batch."""
    try:
        return int((out / "progress").read_text() or 0)
    except (OSError, ValueError):
        return 0


def checkpoint_files(logdir: Path) -> list[str]:
    return sorted(path.name for path in (logdir / "checkpoints").iterdir())


def csv_rows(logdir: Path, loader: str = "train") -> list[str]:
    return (logdir / "logs" / f"{loader}.csv").read_text().splitlines()[1:]
