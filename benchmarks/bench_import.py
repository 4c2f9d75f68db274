"""Import time of ddprun over torch alone, each measured in fresh interpreters.

For each statement (``import torch``, ``import ddprun``, ``from ddprun import dl``) runs
``python -c`` with time.perf_counter() around the import, `--reps` times, interleaved, and
reports medians and the delta over ``import torch`` (median of the paired differences of
adjacent runs); also the increment with torch already imported (the same process imports torch,
then ddprun) and the slowest ddprun-side modules from ``python -X importtime``.

    python benchmarks/bench_import.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import bench_common as bc

STATEMENTS = {
    "torch": "import torch",
    "ddprun": "import ddprun",
    "dl": "from ddprun import dl",
}
TIMER = "import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
INCREMENT = (
    "import time; import torch; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
)


def _time(code: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def importtime_top(stmt: str, top: int = 8) -> list[tuple[str, float]]:
    """Modules with the largest cumulative import time that torch does not import itself:
    those whose name does not start with torch (and are not imported by ``import torch``)."""
    base = _importtime_modules("import torch")
    rows = _importtime_rows(f"import torch; {stmt}")
    extra = [(name, cum) for name, cum in rows if name not in base]
    # Cumulative times nest; keep the top-level entries (least indented) that are not torch's.
    return sorted(extra, key=lambda item: -item[1])[:top]


def _importtime_output(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True
    ).stderr


def _importtime_rows(code: str) -> list[tuple[str, float]]:
    rows = []
    for line in _importtime_output(code).splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        rows.append((name.strip(), int(cumulative) / 1e6))
    return rows


def _importtime_modules(code: str) -> set[str]:
    return {name for name, _ in _importtime_rows(code)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 runs per statement")
    parser.add_argument("--reps", type=int, default=None, help="runs per statement (default 9)")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 9)
    fresh: dict[str, list[float]] = {key: [] for key in STATEMENTS}
    increment: dict[str, list[float]] = {key: [] for key in STATEMENTS if key != "torch"}
    for _ in range(reps):
        for key, stmt in STATEMENTS.items():
            fresh[key].append(_time(TIMER.format(stmt=stmt)))
        for key in increment:
            increment[key].append(_time(INCREMENT.format(stmt=STATEMENTS[key])))
    torch_s = bc.median(fresh["torch"])
    top = importtime_top(STATEMENTS["dl"])
    for key in ("ddprun", "dl"):
        bc.emit(
            {
                "section": "import",
                "statement": STATEMENTS[key],
                "reps": reps,
                "torch_s": torch_s,
                "fresh_s": bc.median(fresh[key]),
                # runs of torch and of this statement alternate: the median of the paired
                # differences is steadier than the difference of the medians on a busy machine
                "delta_s": bc.median([a - b for a, b in zip(fresh[key], fresh["torch"])]),
                "delta_of_medians_s": bc.median(fresh[key]) - torch_s,
                "increment_s": bc.median(increment[key]),
                "target_delta_s": 0.1,
                **({"slowest_extra_modules": top} if key == "dl" else {}),
            }
        )


if __name__ == "__main__":
    main()
