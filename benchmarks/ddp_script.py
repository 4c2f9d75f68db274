"""The distributed benchmark's worker script, started by a launcher (``ddprun --nproc 2`` or
``torchrun --standalone --nproc-per-node 2``); `bench_ddp.py` runs it.

``--mode plain``: the hand-written DDP loop (init_process_group("gloo"), DistributedSampler,
DistributedDataParallel, one all-reduce of the loader sums). ``--mode ddprun``: the same work
through ``dl.Runner.train`` with ``DistributedDataParallelEngine``; ``--mode ddprun-nostop`` is
the same without the engine's in-loop stop agreement (to measure what it costs).
``--mode lockstep``: both, in one process group, taking turns every ``--every`` train steps (see
`lockstep`). Rank 0 writes its timings (train time per step, the time.time() of its first
training step, ...) as JSON to ``--result``.
"""

from __future__ import annotations

import time

SCRIPT_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import bench_common as bc  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode", choices=("plain", "ddprun", "ddprun-nostop", "lockstep"), required=True
    )
    parser.add_argument("--every", type=int, default=7, help="lockstep: steps per turn")
    parser.add_argument(
        "--first", choices=("plain", "ddprun"), default="plain", help="lockstep: who starts"
    )
    parser.add_argument("--model", choices=bc.MODELS, default="tiny")
    parser.add_argument("--result", required=True)
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = bc.Workload().quick() if args.quick else bc.Workload()
    rank = int(os.environ.get("RANK", "0"))
    logdir = Path(args.logdir) / f"{args.mode}-{args.model}"
    with bc.quiet():
        if args.mode == "lockstep":
            results = lockstep(work, args.model, logdir, args.every, args.first)
            if rank == 0:
                payload = {side: result.as_dict() for side, result in results.items()}
                extra = {"every": args.every, "first": args.first}
                Path(args.result).write_text(json.dumps({**payload, **extra}))
        elif args.mode == "plain":
            import torch.distributed as dist

            dist.init_process_group("gloo")
            result = bc.plain_train(work, args.model, logdir, ddp=True)
            _write(args.result, rank, result)  # before teardown, as the ddprun side does
            dist.destroy_process_group()
        else:
            from ddprun import dl

            engine = dl.DistributedDataParallelEngine(backend="gloo")
            if args.mode == "ddprun-nostop":
                # Measurement only: the per-train-batch stop agreement (an all-reduce on the
                # control group) replaced by the single-process answer, to price it.
                engine.agree_to_stop = lambda signum, every=1: (signum, every)
            result = bc.ddprun_train(work, args.model, logdir, engine=engine, ddp=True)
            _write(args.result, rank, result)


def lockstep(
    work: bc.Workload, model: str, logdir: Path, every: int, first: str
) -> dict[str, bc.RunResult]:
    """The hand-written DDP loop and the ddprun Runner in one process group, taking turns every
    `every` train steps (`bench_common.lockstep`)."""
    import torch.distributed as dist

    from ddprun import dl

    dist.init_process_group("gloo")

    def plain_side(pause: Any) -> bc.RunResult:
        return bc.plain_train(work, model, logdir / "plain", ddp=True, pause=pause)

    def ddprun_side(pause: Any) -> bc.RunResult:
        engine = dl.DistributedDataParallelEngine(backend="gloo")
        engine.teardown = lambda: None  # the group is shared with the other side: left below
        return bc.ddprun_train(work, model, logdir / "ddprun", engine=engine, ddp=True, pause=pause)

    results = bc.lockstep(plain_side, ddprun_side, every, first)
    dist.destroy_process_group()
    return results


def _write(path: str, rank: int, result: bc.RunResult) -> None:
    if rank == 0:
        payload = {**result.as_dict(), "script_start": SCRIPT_START, "script_end": time.time()}
        Path(path).write_text(json.dumps(payload))


if __name__ == "__main__":
    main()
