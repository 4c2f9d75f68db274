"""Single-process per-step overhead: the hand-written loop vs ddprun's Runner, alternately.

For each model, runs plain, ddprun, plain, ddprun, ... (`--reps` pairs, after one discarded
warm-up pair) in this process with one thread, and reports the median train time per step of
each, the median of the per-pair ratios ddprun/plain (pairs are adjacent in time, so a busy
neighbour on a shared machine hits both sides of a pair) and the whole-run wall times.

(No lockstep here, unlike bench_ddp.py: in one process the side that starts a lockstep run came
out up to 1.7x slower for the whole run, an artifact larger than what it measures; the
alternating whole runs above already repeat within a few percent.)

    python benchmarks/bench_single.py [--quick] [--reps N] [--models ...]
"""

from __future__ import annotations

import argparse
import time

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 epoch of 4096 samples, 3 reps")
    parser.add_argument("--reps", type=int, default=None, help="plain/ddprun pairs (default 5)")
    parser.add_argument("--models", default=",".join(bc.MODELS))
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


if __name__ == "__main__":
    main()
