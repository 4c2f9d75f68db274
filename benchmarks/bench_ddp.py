"""Two processes on gloo: ``ddprun --nproc 2`` vs ``torchrun --standalone --nproc-per-node 2``.

Per model, rounds in rotating order of: torchrun + the hand-written DDP script (reference),
ddprun + the Runner (the user's path) and ddprun + the hand-written script (a control: the
launcher alone). Reports rank 0's train time per step, the whole process (just before Popen to
exit), the launcher process's own CPU time (not its workers') and the start-up (just before
Popen to the first train batch, stamped with time.time() by `bench_common.StepClock`).

Then `--lockstep-pairs` pairs of ``ddprun --nproc 2`` launches running both loops in one
process group, taking turns every 7 train steps (`bench_common.lockstep`; plain starts one
launch of a pair, ddprun the other): the step time of a 2-rank job drifts by +-30% between
launches on a shared 2-core box, and turns of a few milliseconds see the same conditions.

``--parts sync``: a ``ddprun --nproc 2`` job training with 1, 5 and 20 metric callbacks plus the
loss; the Python-level torch.distributed collectives (not DDP's C++ gradient all-reduces) per
batch and at each loader end of the second epoch, and their bytes (one reduction is tested).

The launchers start this file as the worker (``--worker plain|ddprun|lockstep|sync``).

    python benchmarks/bench_ddp.py [--quick] [--reps N] [--lockstep-pairs N] [--models tiny,mlp]
                                   [--parts separate,lockstep,sync]
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import bench_common as bc
import torch

COMBOS = (("torchrun", "plain"), ("ddprun", "ddprun"), ("ddprun", "plain"))
TARGETS = {"tiny": 1.10, "mlp": 1.03}
SYNC_COUNTS = (1, 5, 20)
NAMES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce")


def launcher_command(launcher: str, logdir: str) -> list[str]:
    """The launcher's installed entry point next to this interpreter (not a pyenv shim, whose
    own start-up would count), else ``python -m``."""
    module = {"torchrun": "torch.distributed.run", "ddprun": "ddprun"}[launcher]
    found = Path(sys.executable).parent / launcher
    if not (found.is_file() and os.access(found, os.X_OK)):
        found = shutil.which(launcher)
    cmd = [str(found)] if found and "shims" not in str(found) else [sys.executable, "-m", module]
    if launcher == "torchrun":
        return [*cmd, "--standalone", "--nproc-per-node", "2"]
    return [*cmd, "--nproc", "2", "--logdir", logdir]


def _wait_measuring_cpu(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for `proc`; return its exit code and the launcher process's own CPU time, read
    after it exited but before it is reaped (WNOWAIT), so its shutdown work counts."""
    import psutil

    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return -9, float("nan")
        time.sleep(0.05)
    try:
        times = psutil.Process(proc.pid).cpu_times()
    except psutil.Error:
        return proc.wait(), float("nan")
    return proc.wait(), times.user + times.system


def run_once(
    launcher: str, mode: str, model: str, quick: bool, timeout: float, *extra: str
) -> dict:
    """One launch of this file as the worker; rank 0's result with the launch's timings."""
    with tempfile.TemporaryDirectory(prefix="ddprun-bench-ddp-") as folder:
        result_file = Path(folder, "result.json")
        cmd = [*launcher_command(launcher, str(Path(folder, "launcher-logs"))), __file__]
        cmd += ["--worker", mode, "--models", model, "--result", str(result_file)]
        cmd += ["--logdir", str(Path(folder, "run")), *(["--quick"] if quick else []), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what both launchers pick on two cores
        with open(Path(folder, "output.log"), "w") as output:
            start = time.time()
            proc = subprocess.Popen(
                cmd, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=folder
            )
            code, launcher_cpu = _wait_measuring_cpu(proc, timeout)
            end = time.time()
        tail = Path(folder, "output.log").read_text(errors="replace")[-2000:]
        if not result_file.exists():
            raise RuntimeError(f"{launcher} + {mode} script failed (exit {code}):\n{tail}")
        if code != 0:  # rank 0 finished training but the job failed at exit
            bc.log(f"  note: {launcher}+{mode} exited {code} after training: {tail[-200:]}")
        result = json.loads(result_file.read_text())
    result = result if isinstance(result, dict) else {"payload": result}
    result.update(exit_code=code, process_wall_s=end - start, launcher_cpu_s=launcher_cpu)
    if mode in ("plain", "ddprun"):
        result["startup_s"] = result["first_step_time"] - start
    return result


def count_collectives() -> dict[str, Any]:
    """From now on, count the torch.distributed collectives in `NAMES` (any group) and the bytes
    of the tensors handed to them: ``{"ops": [...], "bytes": n}``."""
    counter: dict[str, Any] = {"ops": [], "bytes": 0}

    def wrap(name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counter["ops"].append(name)
            if args and isinstance(args[0], torch.Tensor):
                counter["bytes"] += args[0].numel() * args[0].element_size()
            return original(*args, **kwargs)

        return counted

    for name in NAMES:
        setattr(torch.distributed, name, wrap(name, getattr(torch.distributed, name)))
    return counter


def through_runner(engine: Any, n: int, counter: dict[str, Any]) -> dict[str, Any]:
    from torch import nn

    from ddprun import dl

    class LoaderCount(dl.Callback):
        rows: list[dict[str, Any]] = []

        def on_loader_start(self, runner: Any) -> None:
            self.start = self.last = (len(counter["ops"]), counter["bytes"])

        def on_batch_end(self, runner: Any) -> None:
            self.last = (len(counter["ops"]), counter["bytes"])

        def on_loader_end(self, runner: Any) -> None:
            (last, last_bytes), batches = self.last, runner.loader_batch_step
            row = {"epoch": runner.global_epoch_step, "loader": runner.loader_key}
            row.update(batches=batches, per_batch=(last - self.start[0]) / max(batches, 1))
            row.update(at_end=len(counter["ops"]) - last, ops=counter["ops"][last:])
            self.rows.append({**row, "bytes": counter["bytes"] - last_bytes})

    kinds = (dl.AccuracyCallback, dl.PrecisionRecallF1SupportCallback, dl.ConfusionMatrixCallback)
    options = ({"topk_args": (1, 3)}, {"num_classes": 10}, {"num_classes": 10})
    callbacks = {f"m{i}": kinds[i % 3]("logits", "targets", **options[i % 3]) for i in range(n)}
    callbacks["criterion"] = dl.CriterionCallback(input_key="logits", target_key="targets")
    callbacks["optimizer"] = dl.OptimizerCallback(metric_key="loss")
    callbacks["_count"] = probe = LoaderCount(order=10_000)
    # 16 train batches per rank: several stop agreements, counted per batch
    work = bc.Workload(epochs=2, train_samples=2048, valid_samples=256)
    torch.manual_seed(0)
    model = bc.make_model("tiny")
    with bc.quiet():
        bc._classes()[0]().train(
            model=model,
            criterion=nn.CrossEntropyLoss(),
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            loaders=bc.make_loaders(work),
            engine=engine,
            callbacks=callbacks,
            loggers={},
            num_epochs=work.epochs,
        )
    record = {row["loader"]: row for row in probe.rows if row["epoch"] == 2}
    return {"metric_callbacks": n, **record, "at_end": max(r["at_end"] for r in record.values())}


def worker(args: argparse.Namespace) -> None:
    """One rank of a launched job: the hand-written loop, the Runner, or both in lockstep."""
    import torch.distributed as dist

    from ddprun import dl

    torch.set_num_threads(1)
    work = bc.Workload().quick() if args.quick else bc.Workload()
    logdir = Path(args.logdir) / args.worker
    rank = int(os.environ.get("RANK", "0"))
    with bc.quiet():
        if args.worker == "sync":
            engine = dl.DistributedDataParallelEngine(backend="gloo")
            engine.teardown = lambda: None  # one group for every run: destroyed below
            engine.setup()
            counter = count_collectives()
            payload = [through_runner(engine, n, counter) for n in SYNC_COUNTS]
        elif args.worker in ("ddprun", "fsdp"):
            engine = (
                dl.FSDPEngine(backend="gloo")
                if args.worker == "fsdp"
                else dl.DistributedDataParallelEngine(backend="gloo")
            )
            payload = asdict(bc.ddprun_train(work, args.models, logdir, engine, ddp=True))
        else:
            dist.init_process_group("gloo")
            if args.worker == "plain":
                payload = asdict(bc.plain_train(work, args.models, logdir, ddp=True))
            else:

                def ours(pause: object) -> bc.RunResult:
                    engine = dl.DistributedDataParallelEngine(backend="gloo")
                    engine.teardown = lambda: None  # the group is shared: destroyed below
                    clock = bc.StepClock(pause)  # type: ignore[arg-type]
                    return bc.ddprun_train(work, args.models, logdir, engine, True, clock)

                def plain(pause: object) -> bc.RunResult:
                    clock = bc.StepClock(pause)  # type: ignore[arg-type]
                    return bc.plain_train(work, args.models, logdir / "plain", True, clock=clock)

                results = bc.lockstep(plain, ours, 7, args.first)
                payload = {side: asdict(result) for side, result in results.items()}
    if rank == 0:  # before the hand loop's group teardown (ddprun's train did its own)
        Path(args.result).write_text(json.dumps(payload))
    if dist.is_initialized():
        dist.destroy_process_group()


def separate(model: str, reps: int, quick: bool, timeout: float, starts: dict) -> dict:
    """`reps` rounds of the three launcher + script combinations, in rotating order."""
    runs: dict[tuple[str, str], list[dict]] = {combo: [] for combo in COMBOS}
    for rep in range(reps):
        for combo in COMBOS[rep % 3 :] + COMBOS[: rep % 3]:
            result = run_once(*combo, model, quick, timeout)
            runs[combo].append(result)
            starts[combo].append(result["startup_s"])
            bc.log(
                f"  ddp/{model} {rep + 1}/{reps} {'+'.join(combo)}: median step "
                f"{bc.fmt_time(result['step_median_s'])}, start-up {result['startup_s']:.2f} s"
            )
    ref, ours, control = (runs[c] for c in COMBOS)
    record = {"section": "ddp", "model": model, "reps": reps, "target": TARGETS[model]}
    for name, key in (("step", "step_median_s"), ("cpu", "cpu_step_s")):
        record[name] = bc.ratios(ours, ref, key)
    record["wall"] = bc.ratios(ours, ref, "process_wall_s")
    record["launcher_cpu"] = bc.ratios(ours, ref, "launcher_cpu_s")
    record["control_cpu_s"] = bc.median([r["cpu_step_s"] for r in control])
    record["control_wall_s"] = bc.median([r["process_wall_s"] for r in control])
    return record


def lockstep(model: str, pairs: int, quick: bool, timeout: float) -> dict:
    """`pairs` pairs of lockstep launches (plain starts one of a pair, ddprun the other)."""
    records = []
    for run in range(2 * pairs):
        first = ("plain", "ddprun")[run % 2]
        records.append(run_once("ddprun", "lockstep", model, quick, timeout, "--first", first))
        plain, ours = records[-1]["plain"], records[-1]["ddprun"]
        bc.log(
            f"  lockstep/{model} {run + 1}/{2 * pairs}: plain "
            f"{bc.fmt_time(plain['step_median_s'])}, ddprun {bc.fmt_time(ours['step_median_s'])}"
        )
    plain, ours = [r["plain"] for r in records], [r["ddprun"] for r in records]
    # both sides train the same model on the same data in the same group: the same result
    same = all(abs(o["valid_loss"] - p["valid_loss"]) < 1e-4 for o, p in zip(ours, plain))
    record = {"section": "ddp_lockstep", "model": model, "pairs": pairs, "every": 7}
    record["step"] = bc.ratios(ours, plain, balanced=True)
    return {**record, "target": TARGETS[model], "same_note": "" if same else "; **differs**"}


def fsdp_vs_ddp(model: str, reps: int, quick: bool, timeout: float) -> dict:
    """The same Runner script on the DDP and on the FSDP engine (2 ranks, gloo, CPU), launched
    alternately: FSDP's cost of gathering parameters and reduce-scattering gradients."""
    runs: dict[str, list[dict]] = {"ddprun": [], "fsdp": []}
    for rep in range(reps):
        for mode in ("ddprun", "fsdp") if rep % 2 == 0 else ("fsdp", "ddprun"):
            runs[mode].append(run_once("ddprun", mode, model, quick, timeout))
    record = {"section": "fsdp", "model": model, "reps": reps}
    return {**record, "step": bc.ratios(runs["fsdp"], runs["ddprun"], "step_median_s")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None, help="rounds (default 3, quick 2)")
    parser.add_argument("--lockstep-pairs", type=int, default=None, help="(3, quick 1; 0: none)")
    parser.add_argument("--models", default=",".join(bc.MODELS))
    parser.add_argument("--timeout", type=float, default=300.0, help="per launch, seconds")
    parser.add_argument("--parts", default="separate,lockstep,sync", help="what to run")
    parser.add_argument("--worker", choices=("plain", "ddprun", "fsdp", "lockstep", "sync"))
    parser.add_argument("--result", help="worker: rank 0 writes its JSON here")
    parser.add_argument("--logdir", help="worker: the runs' logs and checkpoints")
    parser.add_argument("--first", choices=("plain", "ddprun"), default="plain")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if "sync" in args.parts:
        for record in run_once("ddprun", "sync", "tiny", False, args.timeout)["payload"]:
            bc.emit({"section": "sync", **record})
    reps = args.reps or (2 if args.quick else 3)
    pairs = args.lockstep_pairs if args.lockstep_pairs is not None else (1 if args.quick else 3)
    starts: dict[tuple[str, str], list[float]] = {combo: [] for combo in COMBOS}
    for model in args.models.split(",") if "separate" in args.parts else ():
        bc.emit(separate(model, reps, args.quick, args.timeout, starts))
        if pairs and "lockstep" in args.parts:
            bc.emit(lockstep(model, pairs, args.quick, args.timeout))
    for model in args.models.split(",") if "fsdp" in args.parts else ():
        bc.emit(fsdp_vs_ddp(model, reps, args.quick, args.timeout))
    if "separate" not in args.parts:
        return
    ref, ours, control = (bc.median(starts[c]) for c in COMBOS)
    record = {"section": "startup", "runs": len(starts[COMBOS[0]]), "target_delta_s": 0.5}
    record.update(torchrun_s=ref, ddprun_s=ours, control_s=control)
    bc.emit({**record, "delta_s": ours - ref, "launcher_delta_s": control - ref})


if __name__ == "__main__":
    main()
