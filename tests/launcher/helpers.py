"""Helpers for launcher tests: run the real ``ddprun`` CLI in real processes, always clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

# Every worker script starts like this: one intra-op thread, torch.distributed at hand.
PREAMBLE = """\
import os, sys, time
import torch
import torch.distributed as dist
torch.set_num_threads(1)
RANK = int(os.environ["RANK"])
"""

# Variables that would leak a surrounding launcher or scheduler into the test's ddprun.
_LEAKY_PREFIXES = ("DDPRUN_", "SLURM_", "TORCHELASTIC_")
_LEAKY_NAMES = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
}


@dataclass
class Result:
    """What a finished ddprun run left behind."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def write_script(folder: Path, name: str, body: str, preamble: bool = True) -> Path:
    """Write a worker script (PREAMBLE + dedented body) to folder/name."""
    path = folder / name
    path.write_text((PREAMBLE if preamble else "") + textwrap.dedent(body))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without launcher/scheduler variables, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_LEAKY_PREFIXES) and key not in _LEAKY_NAMES
    }
    env.update(extra)
    return env


def ddprun_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "ddprun", *map(str, args)]


def worker_processes(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) ddprun workers whose command line mentions `marker`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if "ddprun.launch.worker" in cmdline and any(marker in arg for arg in cmdline):
            found.append(proc)
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_everything(process: subprocess.Popen, marker: str) -> None:
    """SIGKILL the launcher's process group and every worker whose command line has `marker`."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    for worker in worker_processes(marker):
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # each worker leads its own session
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def launched(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> Iterator[subprocess.Popen]:  # fmt: skip
    """Start ``python -m ddprun ARGS`` in its own session; on exit kill it and its workers.

    stdout/stderr go to files in tmp_path (no pipe can fill up while a test waits); read them
    with `read_output`.
    """
    out = open(tmp_path / "launcher.out", "w")  # noqa: SIM115
    err = open(tmp_path / "launcher.err", "w")  # noqa: SIM115
    process = subprocess.Popen(
        ddprun_argv(*args),
        cwd=cwd or tmp_path,
        env=env or clean_env(),
        stdout=out,
        stderr=err,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        kill_everything(process, str(tmp_path))
        out.close()
        err.close()


def read_output(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "launcher.out").read_text(), (tmp_path / "launcher.err").read_text()


def run_ddprun(tmp_path: Path, *args: str | Path, timeout: float = 60, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> Result:  # fmt: skip
    """Run ddprun to completion (or kill it after `timeout`) and return what it printed."""
    start = time.monotonic()
    with launched(tmp_path, *args, env=env, cwd=cwd) as process:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    stdout, stderr = read_output(tmp_path)
    code = process.returncode if process.returncode is not None else -9
    return Result(code, stdout, stderr, time.monotonic() - start)
