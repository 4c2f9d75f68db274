"""Helpers of the FSDP tests: run the scripts in scripts/ through the real ``ddprun`` CLI (or
plain python), always cleaned up, and read what they leave."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.launcher.helpers import clean_env, kill_everything

SCRIPTS = Path(__file__).parent / "scripts"
TRAIN = SCRIPTS / "train.py"


def run(argv: list[str | Path], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `argv` (see `run_all`)."""
    return run_all([(argv, cwd)], timeout)[0]


def run_all(
    commands: list[tuple[list[str | Path], Path]], timeout: float
) -> list[subprocess.CompletedProcess]:
    """Run each ``(argv, cwd)`` at the same time, each in its own session with stdout/stderr in
    files in its `cwd`; after they end (or `timeout` seconds) kill every process group and every
    ddprun worker whose command line mentions a `cwd`. Output: stdout + stderr."""
    env = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = []
    for argv, cwd in commands:
        cwd.mkdir(parents=True, exist_ok=True)
        with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
            process = subprocess.Popen(
                [str(a) for a in argv], cwd=cwd, env=env, stdout=out, stderr=err,
                start_new_session=True,
            )  # fmt: skip
        started.append(process)
    deadline = time.monotonic() + timeout
    try:
        for process in started:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for process, (_, cwd) in zip(started, commands):
            kill_everything(process, str(cwd))
    results = []
    for process, (argv, cwd) in zip(started, commands):
        output = (cwd / "out.txt").read_text() + (cwd / "err.txt").read_text()
        results.append(subprocess.CompletedProcess(argv, process.returncode, output, ""))
    return results


def ddprun(nproc: int, script: Path, *args: str | Path, launcher: list[str] = ()) -> list:
    """argv of ``python -m ddprun --nproc N [launcher flags] script args``."""
    return [sys.executable, "-m", "ddprun", "--nproc", str(nproc), *launcher, script, *args]


def weights(logdir: Path) -> dict[str, torch.Tensor]:
    """final_weights.json of a train.py run."""
    data = json.loads((logdir / "final_weights.json").read_text())
    return {key: torch.tensor(value) for key, value in data.items()}


def metrics(logdir: Path) -> dict[str, dict[str, float]]:
    return json.loads((logdir / "metrics.json").read_text())["epoch_metrics"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def flat_model_state(state: dict) -> dict[str, torch.Tensor]:
    """A checkpoint's model state with a dict model's keys prefixed ``<key>.``, as
    final_weights.json writes them."""
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        return dict(state)
    return {f"{key}.{name}": t for key, sd in state.items() for name, t in sd.items()}
