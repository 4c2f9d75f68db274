"""Every example runs as a user would start it and learns Digits well above chance (0.1)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _last_valid_row(logdir: Path) -> dict[str, str]:
    with open(logdir / "logs" / "valid.csv") as handle:
        return list(csv.DictReader(handle))[-1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "script",
    ["custom_runner", "multi_model", "multi_optimizer", "multi_criterion", "finetune_multistage"],
)
def test_example_runs_and_learns_and_matches_under_ddprun(tmp_path, script):
    """As a user starts it, then under `ddprun --nproc 2` with no extra flag: the engine
    follows the launch, and 2 x batch 16 gives the metrics of 1 x batch 32."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    command = [sys.executable, str(EXAMPLES / f"{script}.py"), "--epochs", "2"]
    result = subprocess.run(
        [*command, "--logdir", str(single)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(single / "logs" / "valid.csv") as handle:
        rows = list(csv.DictReader(handle))
    stages = 2 if script == "finetune_multistage" else 1
    assert len(rows) == 2 * stages
    assert float(rows[-1]["accuracy01"]) > 0.85
    assert (single / "checkpoints" / "best.pth").is_file()

    launched = [sys.executable, "-m", "ddprun", "--nproc", "2", *command[1:]]
    result = subprocess.run(
        [*launched, "--logdir", str(multi), "--batch-size", "16"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    one, two = _last_valid_row(single), _last_valid_row(multi)
    assert one.keys() == two.keys()
    for key in one:
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-4, abs=1e-5), key
