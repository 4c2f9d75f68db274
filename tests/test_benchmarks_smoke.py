"""Smoke test of the benchmark runner: the quick single-process section prints the markdown
table with numeric ratios. Nothing here asserts on timings (the machine may be busy)."""

from __future__ import annotations

import json
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


@pytest.mark.timeout(150)
def test_fresh_processes_method_prints_paired_ratios() -> None:
    """One pair of fresh processes (plain, then ddprun) on the quick lean workload: a record
    with positive per-batch times, a paired ratio and each whole process's wall time."""
    script = ROOT / "benchmarks" / "bench_single.py"
    argv = ["--quick", "--methods", "fresh", "--models", "tiny", "--reps", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), *argv], cwd=ROOT, capture_output=True, text=True, timeout=140
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    prefix = "BENCH_RESULT "
    records = [
        json.loads(ln[len(prefix) :]) for ln in proc.stdout.splitlines() if ln.startswith(prefix)
    ]
    assert len(records) == 1, proc.stdout[-2000:]
    record = records[0]
    assert (record["method"], record["workload"], record["model"]) == ("fresh", "lean", "tiny")
    assert record["step"]["ref"] > 0 and record["step"]["ours"] > 0
    assert record["step"]["ratio"] == pytest.approx(record["step"]["ours"] / record["step"]["ref"])
    assert record["process"]["ref"] > record["step"]["ref"] and record["later"] is None


@pytest.mark.timeout(300)
def test_gpu_script_runs_its_loops_on_the_cpu() -> None:
    """bench_gpu.py's CPU path: the shared loops in fp32, bf16 and fp16, one record each."""
    script = ROOT / "benchmarks" / "bench_gpu.py"
    argv = [
        "--device",
        "cpu",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--reps",
        "1",
        "--models",
        "mlp",
    ]
    proc = subprocess.run(
        [sys.executable, str(script), *argv], cwd=ROOT, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    prefix = "BENCH_RESULT "
    records = [
        json.loads(ln[len(prefix) :]) for ln in proc.stdout.splitlines() if ln.startswith(prefix)
    ]
    assert [r["precision"] for r in records] == ["fp32", "bf16", "fp16"]
    for record in records:
        assert record["device"] == "cpu" and record["plain_syncs"] is None
        assert record["plain_samples_per_s"] > 0 and record["ddprun_samples_per_s"] > 0
