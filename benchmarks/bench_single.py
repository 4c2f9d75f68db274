"""Single-process per-step overhead: the hand-written loop vs ddprun's Runner, alternately.

For each model, runs plain, ddprun, plain, ddprun, ... (`--reps` pairs, after one discarded
warm-up pair) in this process with one thread, and reports the median train time per step of
each, the median of the per-pair ratios ddprun/plain (pairs are adjacent in time, so a busy
neighbour on a shared machine hits both sides of a pair) and the whole-run wall times.

Then `--lockstep-pairs` pairs of lockstep runs (`bench_common.lockstep`): both sides in this
process, taking turns every 7 train steps, so both see the same machine conditions.

    python benchmarks/bench_single.py [--quick] [--reps N] [--lockstep-pairs N] [--models ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import bench_common as bc
import torch


def measure(work: bc.Workload, model: str, reps: int) -> dict:
    def one(kind: str) -> bc.RunResult:
        with bc.temp_logdir(f"{kind}-{model}") as logdir, bc.quiet():
            if kind == "plain":
                return bc.plain_train(work, model, logdir)
            return bc.ddprun_train(work, model, logdir)

    warm = bc.replace(work, epochs=1, train_samples=min(work.train_samples, 2048))
    for kind in ("plain", "ddprun"):
        with bc.temp_logdir("warm") as logdir, bc.quiet():
            (bc.plain_train if kind == "plain" else bc.ddprun_train)(warm, model, logdir)
    plain: list[bc.RunResult] = []
    ours: list[bc.RunResult] = []
    for rep in range(reps):
        # Alternate which side goes first, so neither always follows the other.
        order = ("plain", "ddprun") if rep % 2 == 0 else ("ddprun", "plain")
        for kind in order:
            (plain if kind == "plain" else ours).append(one(kind))
        bc.log(
            f"  single/{model} rep {rep + 1}/{reps}: median step plain "
            f"{bc.fmt_time(plain[-1].step_median_s)}, ddprun {bc.fmt_time(ours[-1].step_median_s)}"
            f" | mean step plain {bc.fmt_time(plain[-1].step_s)}, "
            f"ddprun {bc.fmt_time(ours[-1].step_s)}"
        )
    ratios = [o.step_median_s / p.step_median_s for o, p in zip(ours, plain)]
    mean_ratios = [o.step_s / p.step_s for o, p in zip(ours, plain)]
    wall_ratios = [o.wall_s / p.wall_s for o, p in zip(ours, plain)]
    return {
        "section": "single",
        "model": model,
        "reps": reps,
        "steps": ours[0].steps,
        "plain_step_s": bc.median([r.step_median_s for r in plain]),
        "ddprun_step_s": bc.median([r.step_median_s for r in ours]),
        "ratio": bc.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "plain_cpu_step_s": bc.median([r.cpu_step_s for r in plain]),
        "ddprun_cpu_step_s": bc.median([r.cpu_step_s for r in ours]),
        "cpu_ratio": bc.median([o.cpu_step_s / p.cpu_step_s for o, p in zip(ours, plain)]),
        "plain_mean_step_s": bc.median([r.step_s for r in plain]),
        "ddprun_mean_step_s": bc.median([r.step_s for r in ours]),
        "mean_ratio": bc.median(mean_ratios),
        "plain_wall_s": bc.median([r.wall_s for r in plain]),
        "ddprun_wall_s": bc.median([r.wall_s for r in ours]),
        "wall_ratio": bc.median(wall_ratios),
        "plain_valid_accuracy": plain[-1].valid_accuracy,
        "ddprun_valid_accuracy": ours[-1].valid_accuracy,
        "target": {"tiny": 1.10, "mlp": 1.02}[model],
    }


def measure_lockstep(work: bc.Workload, model: str, runs: int) -> dict:
    """`runs` lockstep runs of the plain loop and the Runner; the per-step ratio."""
    records = []
    for run in range(runs):
        with bc.temp_logdir(f"lockstep-{model}") as logdir, bc.quiet():
            folder = Path(logdir)

            def plain_side(pause: Any, folder: Path = folder) -> bc.RunResult:
                return bc.plain_train(work, model, folder / "plain", pause=pause)

            def ddprun_side(pause: Any, folder: Path = folder) -> bc.RunResult:
                return bc.ddprun_train(work, model, folder / "ddprun", pause=pause)

            first = ("plain", "ddprun")[run % 2]  # the side that starts pays the warm-up
            records.append(bc.lockstep(plain_side, ddprun_side, first=first))
        plain, ours = records[-1]["plain"], records[-1]["ddprun"]
        bc.log(
            f"  single-lockstep/{model} run {run + 1}/{runs}: median step plain "
            f"{bc.fmt_time(plain.step_median_s)}, ddprun {bc.fmt_time(ours.step_median_s)}"
            f" (x{ours.step_median_s / plain.step_median_s:.3f})"
        )
    ratios = bc.order_balanced(
        [r["ddprun"].step_median_s / r["plain"].step_median_s for r in records]
    )
    return {
        "section": "single_lockstep",
        "model": model,
        "runs": runs,
        "every": 7,
        "steps": records[0]["ddprun"].steps,
        "plain_step_s": bc.median([r["plain"].step_median_s for r in records]),
        "ddprun_step_s": bc.median([r["ddprun"].step_median_s for r in records]),
        "ratio": bc.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "mean_ratio": bc.median([r["ddprun"].step_s / r["plain"].step_s for r in records]),
        "same_valid_loss": all(
            abs(r["plain"].valid_loss - r["ddprun"].valid_loss) < 1e-4 for r in records
        ),
        "target": {"tiny": 1.10, "mlp": 1.02}[model],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 epoch of 4096 samples, 3 reps")
    parser.add_argument("--reps", type=int, default=None, help="plain/ddprun pairs (default 5)")
    parser.add_argument("--models", default=",".join(bc.MODELS))
    parser.add_argument(
        "--lockstep-pairs",
        type=int,
        default=None,
        help="pairs of lockstep runs, plain starting one and ddprun the other (default 3, "
        "quick 1; 0: none)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = bc.Workload()
    if args.quick:
        work = work.quick()
    reps = args.reps or (3 if args.quick else 5)
    for model in args.models.split(","):
        start = time.perf_counter()
        result = measure(work, model, reps)
        result["workload"] = work.as_dict()
        result["seconds"] = time.perf_counter() - start
        bc.emit(result)
        pairs = args.lockstep_pairs if args.lockstep_pairs is not None else (1 if args.quick else 3)
        if pairs:
            bc.emit({**measure_lockstep(work, model, 2 * pairs), "workload": work.as_dict()})


if __name__ == "__main__":
    main()
