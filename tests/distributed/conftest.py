"""Helpers for distributed tests: run scripts in real processes, always cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).parent / "scripts"


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command in its own process group; kill the whole group if it outlives `timeout`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def script(name: str, *args: str, folder: Path = SCRIPTS) -> list[str]:
    """argv for running `folder`/<name>.py (default tests/distributed/scripts) with python."""
    return [sys.executable, str(folder / f"{name}.py"), *args]


def ddprun(
    nproc: int, name: str, *args: str, logdir: Path | None = None, folder: Path = SCRIPTS
) -> list[str]:
    """argv for running `folder`/<name>.py through the real ddprun CLI."""
    extra = ["--logdir", str(logdir)] if logdir is not None else []
    return [
        sys.executable,
        "-m",
        "ddprun",
        "--nproc",
        str(nproc),
        *extra,
        str(folder / f"{name}.py"),
        *args,
    ]


def load_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in json.loads(path.read_text()).items()}


def assert_metrics_close(single: dict, multi: dict, loaders: tuple[str, ...], tol: float = 1e-6):
    for loader in loaders:
        a, b = single["epoch_metrics"][loader], multi["epoch_metrics"][loader]
        assert set(a) == set(b), (loader, set(a) ^ set(b))
        for key in a:
            assert abs(a[key] - b[key]) <= tol, f"{loader}/{key}: {a[key]} != {b[key]}"
