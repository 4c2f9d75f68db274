"""Smoke test of the benchmark runner: the quick single-process section prints the markdown
table with numeric ratios. Nothing here asserts on timings (the machine may be busy)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"


@pytest.mark.timeout(90)
def test_run_all_quick_single_prints_table_with_ratios() -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--only", "single"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Benchmark |"))
    assert lines[header + 1].startswith("|---|")
    rows = [line for line in lines[header + 2 :] if line.startswith("| ")]
    for model in ("tiny", "mlp"):
        row = next(r for r in rows if f"1 process, {model}: train time per step" in r)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.fullmatch(r"x\d+\.\d{3} \(\d+\.\d{2}-\d+\.\d{2}\)", cells[3]), row
        ratio = float(cells[3][1:].split()[0])
        assert ratio > 0
        assert re.search(r"\d", cells[1]) and re.search(r"\d", cells[2]), row
