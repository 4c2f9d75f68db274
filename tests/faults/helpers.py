"""Helpers of the fault-injection suite: launch scripts/train.py through the real ``ddprun`` CLI,
wait for the marker files it writes, and always clean up what a test started."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psutil
import torch

from tests.launcher.helpers import clean_env, worker_processes

SCRIPT = Path(__file__).parent / "scripts" / "train.py"


def load_script() -> ModuleType:
    """scripts/train.py as a module, for the in-process runs (DeviceEngine)."""
    spec = importlib.util.spec_from_file_location("faults_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Launch:
    """One ``python -m ddprun ... train.py ...`` started by a test."""

    process: subprocess.Popen
    folder: Path  # the test's own folder: every worker's command line contains it

    @property
    def output(self) -> str:
        return (self.folder / "launcher.out").read_text() + (
            self.folder / "launcher.err"
        ).read_text()

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the launcher still runs after `timeout` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def workers(self) -> list[psutil.Process]:
        return worker_processes(str(self.folder))


@contextmanager
def launched(
    folder: Path, *args: str | Path, nproc: int = 2, env: dict[str, str] | None = None
) -> Iterator[Launch]:
    """Start ``ddprun --nproc N --logdir folder/launcher ARGS...`` (ARGS: options, then the
    script's arguments after ``--``) in its own session. On exit: SIGKILL the launcher's process
    group and every worker of this test (each leads its own session), then assert that none
    survives."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher_args, script_args = _split(args)
    argv = [sys.executable, "-m", "ddprun", "--nproc", str(nproc),
            "--logdir", str(folder / "launcher"), *launcher_args, str(SCRIPT), *script_args]  # fmt: skip
    environment = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(folder / "launcher.out", "w") as out, open(folder / "launcher.err", "w") as err:
        process = subprocess.Popen(
            argv, cwd=folder, env=environment, stdout=out, stderr=err, start_new_session=True
        )
        launch = Launch(process, folder)
        try:
            yield launch
        finally:
            _kill_group(process.pid)
            process.wait()
            for worker in launch.workers():
                _kill_group(worker.pid)
            survivors = wait_for(lambda: not launch.workers(), 10)
            assert survivors, f"workers of this test survived: {launch.workers()}"


def _split(args: tuple[str | Path, ...]) -> tuple[list[str], list[str]]:
    items = [str(a) for a in args]
    if "--" in items:
        index = items.index("--")
        return items[:index], items[index + 1 :]
    return [], items


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_to_end(folder: Path, *args: str | Path, timeout: float = 60, **kwargs) -> tuple[int, str]:
    """Launch, wait for the launcher to exit (at most `timeout` s); (status, all its output)."""
    with launched(folder, *args, **kwargs) as launch:
        status = launch.wait(timeout)
        assert status is not None, f"ddprun still running after {timeout}s:\n{launch.output}"
        return status, launch.output


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# ----------------------------------------------------------------- what train.py leaves
def progress(logdir: Path, rank: int) -> list[tuple[int, int]]:
    """(attempt, global batch) for every train batch rank `rank` recorded, in order."""
    path = logdir / f"progress_rank{rank}.txt"
    if not path.is_file():
        return []
    entries, attempt = [], -1
    for line in path.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "attempt":
            attempt = int(words[1])
        elif len(words) == 4 and words[0] == "rank" and words[2] == "batch":
            entries.append((attempt, int(words[3])))
    return entries


def batches_of(logdir: Path, rank: int, attempt: int) -> list[int]:
    return [batch for a, batch in progress(logdir, rank) if a == attempt]


def last_batch(logdir: Path, ranks: tuple[int, ...] = (0, 1)) -> int:
    """The highest global batch any rank recorded so far (0 if none)."""
    return max([batch for rank in ranks for _, batch in progress(logdir, rank)], default=0)


def fault_time(logdir: Path, rank: int = 1) -> float | None:
    """When the injected fault fired on `rank` (time.time()), or None if it has not."""
    path = logdir / f"fault_rank{rank}.txt"
    text = path.read_text().split() if path.is_file() else []
    return float(text[-1]) if text and text[-1][0].isdigit() else None


def final_weights(logdir: Path) -> dict[str, torch.Tensor]:
    data = json.loads((logdir / "final_weights.json").read_text())
    return {key: torch.tensor(value) for key, value in data.items()}


def assert_same_weights(expected: Path, actual: Path) -> None:
    a, b = final_weights(expected), final_weights(actual)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"weights differ (not bit for bit) in {different}"


def csv_rows(logdir: Path, loader: str) -> list[dict[str, float]]:
    with (logdir / "logs" / f"{loader}.csv").open(newline="") as stream:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]


def temp_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]
