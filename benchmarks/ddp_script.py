"""The distributed benchmark's worker script, started by a launcher (``ddprun --nproc 2`` or
``torchrun --standalone --nproc-per-node 2``); `bench_ddp.py` runs it.

``--mode plain``: the hand-written DDP loop (init_process_group("gloo"), DistributedSampler,
DistributedDataParallel, one all-reduce of the loader sums). ``--mode ddprun``: the same work
through ``dl.Runner.train`` with ``DistributedDataParallelEngine``; ``--mode ddprun-nostop`` is
the same without the engine's per-batch stop agreement (to measure what it costs). Rank 0 writes its timings
(train time per step, the time.time() of its first training step, ...) as JSON to ``--result``.
"""

from __future__ import annotations

import time

SCRIPT_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_common as bc  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("plain", "ddprun", "ddprun-nostop"), required=True)
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
        if args.mode == "plain":
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
                engine.agree_to_stop = lambda signum, wait=False: signum
            result = bc.ddprun_train(work, args.model, logdir, engine=engine, ddp=True)
            _write(args.result, rank, result)


def _write(path: str, rank: int, result: bc.RunResult) -> None:
    if rank == 0:
        payload = {**result.as_dict(), "script_start": SCRIPT_START, "script_end": time.time()}
        Path(path).write_text(json.dumps(payload))


if __name__ == "__main__":
    main()
