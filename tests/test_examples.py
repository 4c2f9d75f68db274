"""Every example runs as a user would start it and learns Digits well above chance (0.1)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "script",
    ["custom_runner", "multi_model", "multi_optimizer", "multi_criterion", "finetune_multistage"],
)
def test_example_runs_and_learns(tmp_path, script):
    logdir = tmp_path / "logs"
    command = [sys.executable, str(EXAMPLES / f"{script}.py"), "--logdir", str(logdir)]
    result = subprocess.run(
        command + ["--epochs", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(logdir / "logs" / "valid.csv") as handle:
        rows = list(csv.DictReader(handle))
    stages = 2 if script == "finetune_multistage" else 1
    assert len(rows) == 2 * stages
    assert float(rows[-1]["accuracy01"]) > 0.85
    assert (logdir / "checkpoints" / "best.pth").is_file()
