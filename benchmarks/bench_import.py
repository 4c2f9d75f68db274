"""Import time of ddprun over torch alone, each measured in fresh interpreters.

Runs ``python -c`` with time.perf_counter() around ``import torch`` and ``from ddprun
import dl``, `--reps` times, interleaved: medians, and the delta over ``import
torch`` as the median of the paired differences of adjacent runs; also the increment with torch
already imported, and the slowest modules beyond torch's own from ``python -X importtime``.

    python benchmarks/bench_import.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import bench_common as bc

STATEMENTS = {"torch": "import torch", "dl": "from ddprun import dl"}
TIMER = "import time; {before}t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"


def _time(stmt: str, before: str = "") -> float:
    code = TIMER.format(stmt=stmt, before=before)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _importtime(code: str) -> dict[str, float]:
    """Module -> cumulative import seconds, from ``python -X importtime -c code``."""
    cmd = [sys.executable, "-X", "importtime", "-c", code]
    rows = {}
    for line in subprocess.run(cmd, capture_output=True, text=True).stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line[len("import time:") :].split("|")
            rows[name.strip()] = int(cumulative) / 1e6
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 runs per statement")
    parser.add_argument("--reps", type=int, default=None, help="runs per statement (default 9)")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 9)
    fresh: dict[str, list[float]] = {key: [] for key in STATEMENTS}
    increment = []
    for _ in range(reps):
        for key, stmt in STATEMENTS.items():
            fresh[key].append(_time(stmt))
        increment.append(_time(STATEMENTS["dl"], before="import torch; "))
    torch_only = _importtime("import torch")
    extra = _importtime(f"import torch; {STATEMENTS['dl']}")
    slowest = sorted((m for m in extra if m not in torch_only), key=lambda m: -extra[m])[:3]
    medians = {f"{key}_s": bc.median(times) for key, times in fresh.items()}
    # adjacent runs pair up: steadier than the difference of medians on a busy machine
    delta = bc.median([a - b for a, b in zip(fresh["dl"], fresh["torch"])])
    record = {"section": "import", "reps": reps, "target_delta_s": 0.1, **medians}
    bc.emit({**record, "delta_s": delta, "increment_s": bc.median(increment), "slowest": slowest})


if __name__ == "__main__":
    main()
