"""Two processes on gloo: ``ddprun --nproc 2`` vs ``torchrun --standalone --nproc-per-node 2``.

Runs, alternately and in rotating order, for each model:

- ``torchrun`` + the hand-written DDP script (the reference);
- ``ddprun`` + the ddprun script (the user's path);
- ``ddprun`` + the hand-written script (a control: the launcher alone);
- ``ddprun`` + the ddprun script without the engine's in-loop stop agreement (full runs only;
  prices that extra all-reduce; `--no-ablate-stop` leaves it out).

and reports the train time per step (rank 0), the whole-process wall time (just before Popen to
exit), the launcher's own CPU time (the agent process alone, not its workers) and the start-up
time (just before Popen to the moment the script is about to fetch its first training batch,
stamped with time.time() by `bench_common.StepClock`).

Then, per model, `--lockstep-pairs` pairs of launches of ``ddprun --nproc 2`` with the worker
script in ``lockstep`` mode: the hand-written loop and the Runner in one process group, taking
turns every 7 train steps (`bench_common.lockstep`; plain starts one launch of a pair, ddprun the
other). On a shared 2-core machine the step time of a 2-rank gloo job drifts by +-30% from one
second to the next, so two separate launches differ by that much whatever they run; taking turns
every few milliseconds puts both sides under the same conditions.

    python benchmarks/bench_ddp.py [--quick] [--reps N] [--lockstep-pairs N] [--models tiny,mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import bench_common as bc
import psutil

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ddp_script.py"
COMBOS = (
    ("torchrun", "plain"),
    ("ddprun", "ddprun"),
    ("ddprun", "plain"),
)


def _console_script(name: str, module: str) -> list[str]:
    """The installed entry point next to this interpreter (not a pyenv shim, whose own start-up
    would be counted), else ``python -m module``."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return [str(candidate)]
    found = shutil.which(name)
    if found and "shims" not in found:
        return [found]
    return [sys.executable, "-m", module]


def launcher_command(launcher: str, logdir: str) -> list[str]:
    if launcher == "torchrun":
        return [
            *_console_script("torchrun", "torch.distributed.run"),
            "--standalone",
            "--nproc-per-node",
            "2",
        ]
    return [*_console_script("ddprun", "ddprun"), "--nproc", "2", "--logdir", logdir]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # both launchers would pick 1 on two cores; make it explicit
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


def ddprun_runnable(timeout: float = 90.0) -> tuple[bool, str]:
    """Whether ``ddprun --nproc 2`` starts two ranks and exits 0 on a trivial script."""
    probe = (
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1], 'rank' + os.environ.get('RANK', 'x')).write_text('ok')\n"
    )
    with tempfile.TemporaryDirectory(prefix="ddprun-bench-probe-") as folder:
        script = Path(folder, "probe.py")
        script.write_text(probe)
        cmd = [*launcher_command("ddprun", str(Path(folder, "logs"))), str(script), folder]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=folder
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return False, f"{' '.join(cmd[:3])} ... failed: {error}"
        ranks = sorted(p.name for p in Path(folder).glob("rank*"))
        if proc.returncode != 0 or ranks != ["rank0", "rank1"]:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return False, f"exit {proc.returncode}, ranks seen {ranks}: {' | '.join(tail)}"
    return True, ""


def _wait_measuring_cpu(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for `proc`; return its exit code and the CPU time of the launcher process itself
    (its workers are separate processes, not counted), read once it has exited but before it
    is reaped, so its shutdown work is included."""
    deadline = time.monotonic() + timeout
    while True:
        # WNOWAIT: learn that it exited, leaving the zombie (and its CPU times) in place
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return -9, float("nan")
        time.sleep(0.05)
    try:
        times = psutil.Process(proc.pid).cpu_times()
        cpu = times.user + times.system
    except psutil.Error:
        cpu = float("nan")
    return proc.wait(), cpu


def run_once(
    launcher: str, mode: str, model: str, quick: bool, timeout: float, extra: Sequence[str] = ()
) -> dict:
    with tempfile.TemporaryDirectory(prefix="ddprun-bench-ddp-") as folder:
        result_file = Path(folder, "result.json")
        cmd = [
            *launcher_command(launcher, str(Path(folder, "launcher-logs"))),
            str(SCRIPT),
            "--mode",
            mode,
            "--model",
            model,
            "--result",
            str(result_file),
            "--logdir",
            str(Path(folder, "run")),
            *(["--quick"] if quick else []),
            *extra,
        ]
        env = _env()
        with open(Path(folder, "output.log"), "w") as output:
            start = time.time()
            proc = subprocess.Popen(
                cmd, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=folder
            )
            code, launcher_cpu = _wait_measuring_cpu(proc, timeout)
            end = time.time()
        if not result_file.exists():
            tail = Path(folder, "output.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{launcher} + {mode} script failed (exit {code}):\n{tail}")
        result = json.loads(result_file.read_text())
        if code != 0:
            # Training finished (rank 0 wrote its result) but the job failed at exit, e.g. the
            # gloo teardown abort described in ddprun.distributed.shutdown_process_group.
            tail = Path(folder, "output.log").read_text(errors="replace").strip().splitlines()
            bc.log(f"  note: {launcher}+{mode} exited {code} after training: {tail[-1:]} ")
    result["exit_code"] = code
    result["process_wall_s"] = end - start
    result["launcher_cpu_s"] = launcher_cpu
    if mode == "lockstep":
        return result
    result["startup_s"] = result["first_step_time"] - start
    result["to_script_start_s"] = result["script_start"] - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None, help="rounds (default 3, quick 2)")
    parser.add_argument("--models", default=",".join(bc.MODELS))
    parser.add_argument("--timeout", type=float, default=300.0, help="per launch, seconds")
    parser.add_argument(
        "--ablate-stop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run ddprun without its in-loop stop agreement, to price that collective "
        "(default: on, off with --quick)",
    )
    parser.add_argument(
        "--lockstep-pairs",
        type=int,
        default=None,
        help="pairs of lockstep launches per model, plain starting one and ddprun the other "
        "(default 3, quick 1; 0: none)",
    )
    args = parser.parse_args(argv)
    if args.lockstep_pairs is None:
        args.lockstep_pairs = 1 if args.quick else 3
    if args.ablate_stop is None:
        args.ablate_stop = not args.quick
    combos = COMBOS + ((("ddprun", "ddprun-nostop"),) if args.ablate_stop else ())
    ok, why = ddprun_runnable()
    if not ok:
        bc.log(f"skipped: ddprun --nproc 2 is not runnable yet ({why})")
        bc.emit({"section": "ddp", "skipped": f"ddprun --nproc 2 not runnable: {why}"})
        bc.emit({"section": "startup", "skipped": f"ddprun --nproc 2 not runnable: {why}"})
        return
    reps = args.reps or (2 if args.quick else 3)
    startups: dict[tuple[str, str], list[float]] = {combo: [] for combo in combos}
    script_starts: dict[tuple[str, str], list[float]] = {combo: [] for combo in combos}
    for model in args.models.split(","):
        runs: dict[tuple[str, str], list[dict]] = {combo: [] for combo in combos}
        for rep in range(reps):
            shift = rep % len(combos)
            for combo in combos[shift:] + combos[:shift]:
                result = run_once(*combo, model=model, quick=args.quick, timeout=args.timeout)
                runs[combo].append(result)
                startups[combo].append(result["startup_s"])
                script_starts[combo].append(result["to_script_start_s"])
                bc.log(
                    f"  ddp/{model} rep {rep + 1}/{reps} {combo[0]}+{combo[1]}: "
                    f"median step {bc.fmt_time(result['step_median_s'])}, "
                    f"CPU/step {bc.fmt_time(result['cpu_step_s'])}, "
                    f"wall {result['process_wall_s']:.2f} s, start-up {result['startup_s']:.2f} s"
                )
        ref, ours, ctl = (runs[c] for c in COMBOS)
        ratios = [o["step_median_s"] / r["step_median_s"] for o, r in zip(ours, ref)]
        mean_ratios = [o["step_s"] / r["step_s"] for o, r in zip(ours, ref)]
        bc.emit(
            {
                "section": "ddp",
                "model": model,
                "reps": reps,
                "steps": ours[0]["steps"],
                "torchrun_step_s": bc.median([r["step_median_s"] for r in ref]),
                "ddprun_step_s": bc.median([r["step_median_s"] for r in ours]),
                "ddprun_plain_step_s": bc.median([r["step_median_s"] for r in ctl]),
                "ratio": bc.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "mean_ratio": bc.median(mean_ratios),
                "torchrun_cpu_step_s": bc.median([r["cpu_step_s"] for r in ref]),
                "ddprun_cpu_step_s": bc.median([r["cpu_step_s"] for r in ours]),
                "ddprun_plain_cpu_step_s": bc.median([r["cpu_step_s"] for r in ctl]),
                "cpu_ratio": bc.median(
                    [o["cpu_step_s"] / r["cpu_step_s"] for o, r in zip(ours, ref)]
                ),
                "torchrun_wall_s": bc.median([r["process_wall_s"] for r in ref]),
                "ddprun_wall_s": bc.median([r["process_wall_s"] for r in ours]),
                "ddprun_plain_wall_s": bc.median([r["process_wall_s"] for r in ctl]),
                "wall_ratio": bc.median(
                    [o["process_wall_s"] / r["process_wall_s"] for o, r in zip(ours, ref)]
                ),
                "torchrun_launcher_cpu_s": bc.median([r["launcher_cpu_s"] for r in ref]),
                "ddprun_launcher_cpu_s": bc.median([r["launcher_cpu_s"] for r in ours]),
                "target": {"tiny": 1.10, "mlp": 1.03}[model],
                "failed_exits": {
                    f"{c[0]}+{c[1]}": sum(r["exit_code"] != 0 for r in runs[c]) for c in combos
                },
                **(
                    {
                        "ddprun_nostop_step_s": bc.median(
                            [r["step_median_s"] for r in runs[combos[3]]]
                        ),
                        "ddprun_nostop_cpu_step_s": bc.median(
                            [r["cpu_step_s"] for r in runs[combos[3]]]
                        ),
                    }
                    if args.ablate_stop
                    else {}
                ),
                "quick": args.quick,
            }
        )
        if args.lockstep_pairs:
            lockstep(model, 2 * args.lockstep_pairs, args.quick, args.timeout)
    ref, ours, ctl = (bc.median(startups[c]) for c in COMBOS)
    bc.emit(
        {
            "section": "startup",
            "runs_per_combo": len(startups[COMBOS[0]]),
            "torchrun_plain_s": ref,
            "ddprun_ddprun_s": ours,
            "ddprun_plain_s": ctl,
            "delta_s": ours - ref,
            "launcher_delta_s": ctl - ref,
            "torchrun_script_start_s": bc.median(script_starts[COMBOS[0]]),
            "ddprun_script_start_s": bc.median(script_starts[COMBOS[1]]),
            "target_delta_s": 0.5,
        }
    )


def lockstep(model: str, runs: int, quick: bool, timeout: float) -> None:
    """`runs` launches of ``ddprun --nproc 2`` + the lockstep worker; emits the per-step ratio."""
    records = []
    for run in range(runs):
        first = ("plain", "ddprun")[run % 2]  # the side that starts pays the warm-up
        result = run_once("ddprun", "lockstep", model, quick, timeout, ("--first", first))
        plain, ours = result["plain"], result["ddprun"]
        records.append(result)
        bc.log(
            f"  ddp-lockstep/{model} run {run + 1}/{runs}: median step plain "
            f"{bc.fmt_time(plain['step_median_s'])}, ddprun {bc.fmt_time(ours['step_median_s'])}"
            f" (x{ours['step_median_s'] / plain['step_median_s']:.3f})"
        )
    ratios = bc.order_balanced(
        [r["ddprun"]["step_median_s"] / r["plain"]["step_median_s"] for r in records]
    )
    mean_ratios = [r["ddprun"]["step_s"] / r["plain"]["step_s"] for r in records]
    bc.emit(
        {
            "section": "ddp_lockstep",
            "model": model,
            "runs": runs,
            "every": records[0]["every"],
            "steps": records[0]["ddprun"]["steps"],
            "plain_step_s": bc.median([r["plain"]["step_median_s"] for r in records]),
            "ddprun_step_s": bc.median([r["ddprun"]["step_median_s"] for r in records]),
            "ratio": bc.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "mean_ratio": bc.median(mean_ratios),
            # both sides train the same model on the same data in the same group: same result
            "same_valid_loss": all(
                abs(r["plain"]["valid_loss"] - r["ddprun"]["valid_loss"]) < 1e-4 for r in records
            ),
            "target": {"tiny": 1.10, "mlp": 1.03}[model],
            "quick": quick,
        }
    )


if __name__ == "__main__":
    main()
