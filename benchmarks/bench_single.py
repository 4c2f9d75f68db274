"""One process: ddprun's per-batch cost next to a hand-written loop, by two methods.

- ``alternate``: whole runs alternating in this process after a warm-up, full workload
  (`bench_common`); the median train step of each run; median of per-pair ratios.
- ``fresh``: each run a new interpreter, plain, ddprun, plain, ..., lean workload; per batch:
  the training call timed inside the process (no imports, no data set-up) over all its
  batches, the epochs after the first alone, and the whole process timed by this parent.

``--workload`` swaps a method's workload; ``--worker KIND`` is one fresh run (JSON last line).

    python benchmarks/bench_single.py [--quick] [--reps N] [--models tiny,mlp]
                                      [--methods alternate,fresh] [--workload lean|full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import bench_common as bc
import torch

TARGETS = {"tiny": 1.05, "mlp": 1.02}
WORKLOADS = {"alternate": "full", "fresh": "lean"}
REPS = {"alternate": (5, 3), "fresh": (12, 2)}  # pairs: full runs, quick runs (fresh: +-5% apart)


def fresh_run(kind: str, model: str, quick: bool, lean: bool) -> dict:
    """One run of `kind` in a new interpreter; its result with the process's wall time."""
    cmd = [sys.executable, __file__, "--worker", kind, "--models", model]
    cmd += ["--workload", "lean" if lean else "full", *(["--quick"] if quick else [])]
    # glibc's heap thresholds pinned on both sides: by default they move with what the process
    # did before (importing ddprun does), and a process that imported less trims and regrows
    # its heap every MLP step (see RESULTS.md)
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "33554432",
        "MALLOC_TRIM_THRESHOLD_": "268435456",
    }
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    run = json.loads(out.strip().splitlines()[-1])
    run["process_s"] = time.perf_counter() - start
    later = run["epoch_s"][1:]  # the epochs after the first: no first-call costs
    per_epoch = run["steps"] / max(len(run["epoch_s"]), 1)
    run["later_s"] = sum(later) / (per_epoch * len(later)) if later else float("nan")
    return run


def measure(method: str, work: bc.Workload, model: str, reps: int, lean: bool, quick: bool):
    if method == "alternate":
        runs = bc.alternate(
            {k: lambda w, k=k: bc.run_loop(k, w, model, lean) for k in ("plain", "ddprun")},
            work,
            reps,
        )
        plain, ours = runs["plain"], runs["ddprun"]
        return {
            "step": bc.ratios(ours, plain),
            "cpu": bc.ratios(ours, plain, "cpu_step_s"),
            "wall": bc.ratios(ours, plain, "wall_s"),
        }
    plain, ours = [], []
    for rep in range(reps):
        plain.append(fresh_run("plain", model, quick, lean))
        ours.append(fresh_run("ddprun", model, quick, lean))
        bc.log(
            f"  fresh/{model} {rep + 1}/{reps}: plain {bc.fmt_time(plain[-1]['step_s'])}, ddprun {bc.fmt_time(ours[-1]['step_s'])} per batch"
        )
    later = lean and work.epochs > 1
    return {
        "step": bc.ratios(ours, plain, "step_s" if lean else "step_median_s"),
        "later": bc.ratios(ours, plain, "later_s") if later else None,
        "cpu": bc.ratios(ours, plain, "cpu_step_s"),
        "process": bc.ratios(ours, plain, "process_s"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 epoch of 4096 samples")
    parser.add_argument("--reps", type=int, default=None, help="pairs (5, fresh 12; quick 3, 2)")
    parser.add_argument("--models", default=",".join(bc.MODELS))
    parser.add_argument("--methods", default="alternate,fresh")
    parser.add_argument("--workload", choices=("lean", "full"), default=None)
    parser.add_argument("--worker", choices=("plain", "ddprun"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = bc.Workload().quick() if args.quick else bc.Workload()
    if args.worker:
        result = bc.run_loop(args.worker, work, args.models, args.workload == "lean")
        return print(json.dumps(asdict(result)))
    for method in args.methods.split(","):
        workload = args.workload or WORKLOADS[method]
        reps = args.reps or REPS[method][args.quick]
        for model in args.models.split(","):
            found = measure(method, work, model, reps, workload == "lean", args.quick)
            record = {"section": "single", "method": method, "workload": workload}
            bc.emit({**record, "model": model, "reps": reps, "target": TARGETS[model], **found})


if __name__ == "__main__":
    main()
