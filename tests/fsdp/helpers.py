"""Helpers of the FSDP tests: run the scripts in scripts/ through the real ``ddprun`` CLI (or
plain python), always cleaned up, and read what they leave."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.launcher.helpers import clean_env, kill_everything

SCRIPTS = Path(__file__).parent / "scripts"
TRAIN = SCRIPTS / "train.py"


def run(argv: list[str | Path], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `argv` in its own session with stdout/stderr in files; on return (or timeout) kill
    the process group and every ddprun worker whose command line mentions `cwd`."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
        process = subprocess.Popen(
            [str(a) for a in argv], cwd=cwd, env=env, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_everything(process, str(cwd))
    output = (cwd / "out.txt").read_text() + (cwd / "err.txt").read_text()
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, output, "")


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
