"""The one training script of the fault-injection suite (tests/faults).

    ddprun --nproc 2 train.py --logdir DIR [--save-every N] [--fault sigkill --fault-rank 1
        --fault-batch 11 --first-attempt-only] ...
    python train.py --logdir DIR --engine device ...          (one process, DeviceEngine)

An MLP without dropout on a fixed TensorDataset (256 train samples, shuffled, so the distributed
sampler's permutation matters; 64 valid samples), Adam, criterion + optimizer + accuracy
callbacks, a CheckpointCallback selecting on valid/loss (last.pth every --save-every train
batches) and a CSV logger.

What it leaves in --logdir for the tests to wait on and check:

- ``progress_rank<R>.txt``: ``attempt A`` when the script starts (A = TORCHELASTIC_RESTART_COUNT),
  then ``rank R batch B`` (B = global batch step) after every train batch, flushed, written after
  the checkpoint callback, so a batch listed there is covered by any last.pth saved for it;
- ``fault_rank<R>.txt``: written (with the time) just before the fault fires;
- ``final_weights.json`` (rank 0: the state dict as lists) and ``done_rank<R>`` (every rank,
  holding its pid) once training returned.

Faults (on --fault-rank only, at --fault-batch global batch inside handle_batch, or after
training with --fault-at-end; with --first-attempt-only only while TORCHELASTIC_RESTART_COUNT is
0): ``raise`` (RuntimeError), ``sigkill`` (SIGKILL to itself), ``sleep`` (--sleep seconds).
``--fault-at-end`` first waits until rank 0 has written done_rank0 and its process has exited,
so one rank has finished successfully while this one fails.

``--pace S`` sleeps S seconds after every train batch: it only slows training down so that a
test can signal the launcher mid-training; it synchronises nothing.

`main(argv)` also runs in-process (``--engine device``); the tests import it for that.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

NUM_FEATURES, NUM_CLASSES = 8, 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--engine", choices=["ddp", "device"], default="ddp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--save-every", type=int, default=0, help="save_every_n_batches (0: off)")
    parser.add_argument("--async-save", action="store_true", help="CheckpointCallback(async_save)")
    parser.add_argument("--metric-key", default="loss", help="valid metric that selects best")
    parser.add_argument("--load-on-stage-start", default=None, help="a JSON load spec")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds after each train batch")
    parser.add_argument("--fault", choices=["none", "raise", "sigkill", "sleep"], default="none")
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--fault-batch", type=int, default=0, help="global train batch")
    parser.add_argument("--fault-at-end", action="store_true", help="fail after training instead")
    parser.add_argument("--first-attempt-only", action="store_true")
    parser.add_argument("--sleep", type=float, default=60.0, help="seconds, for --fault sleep")
    return parser.parse_args(argv)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, NUM_FEATURES, generator=generator)
    w = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
    y = (x @ w + 0.5 * torch.randn(320, NUM_CLASSES, generator=generator)).argmax(dim=1)
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def make_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class Fault:
    """The fault to inject, and where."""

    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.kind, self.rank, self.batch = args.fault, args.fault_rank, args.fault_batch
        self.at_end, self.sleep = args.fault_at_end, args.sleep
        self.armed = args.fault != "none" and not (args.first_attempt_only and attempt() > 0)
        self.logdir = logdir

    def maybe_fire_in_batch(self, rank: int, global_batch: int) -> None:
        if self.armed and not self.at_end and rank == self.rank and global_batch == self.batch:
            self.fire(rank, f"at batch {global_batch}")

    def maybe_fire_at_end(self, rank: int) -> None:
        if self.armed and self.at_end and rank == self.rank:
            wait_for_rank0_to_exit(self.logdir)
            self.fire(rank, "at experiment end")

    def fire(self, rank: int, where: str) -> None:
        marker = self.logdir / f"fault_rank{rank}.txt"
        marker.write_text(f"{self.kind} {where} {time.time()!r}\n")
        if self.kind == "raise":
            raise RuntimeError(f"injected fault {where}")
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "sleep":
            time.sleep(self.sleep)  # a hang: the peers wait for this rank in a collective


def wait_for_rank0_to_exit(logdir: Path, timeout: float = 60.0) -> None:
    """Poll until rank 0 wrote done_rank0 (its pid) and that process is gone or a zombie."""
    deadline = time.monotonic() + timeout
    done = logdir / "done_rank0"
    while time.monotonic() < deadline:
        if done.is_file() and done.read_text().strip():
            try:
                if psutil.Process(int(done.read_text())).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
        time.sleep(0.05)
    raise TimeoutError(f"rank 0 did not finish within {timeout}s")


class Progress(dl.Callback):
    """Appends ``rank R batch B`` after every train batch (after the checkpoint callback)."""

    def __init__(self, logdir: Path, pace: float) -> None:
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.logdir, self.pace = logdir, pace

    def on_batch_end(self, runner: Any) -> None:
        if not runner.is_train_loader:
            return
        rank = max(runner.engine.rank, 0)
        append_line(
            self.logdir / f"progress_rank{rank}.txt",
            f"rank {rank} batch {runner.global_batch_step}",
        )
        if self.pace:
            time.sleep(self.pace)  # pacing only, so a test can act mid-training


def append_line(path: Path, line: str) -> None:
    with path.open("a") as stream:
        stream.write(line + "\n")
        stream.flush()


class FaultRunner(dl.Runner):
    def __init__(self, fault: Fault) -> None:
        super().__init__()
        self.fault = fault

    def handle_batch(self, batch: Any) -> None:
        if self.is_train_loader:
            self.fault.maybe_fire_in_batch(max(self.engine.rank, 0), self.global_batch_step)
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}


def current_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> FaultRunner:
    args = parse_args(argv)
    torch.set_num_threads(1)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    rank = current_rank() if args.engine == "ddp" else 0
    load_spec = json.loads(args.load_on_stage_start) if args.load_on_stage_start else None
    checkpoint = dl.CheckpointCallback(
        logdir,
        loader_key="valid",
        metric_key=args.metric_key,
        load_on_stage_start=load_spec,
        resume=args.resume,
        save_every_n_batches=args.save_every or None,
        async_save=args.async_save,
    )
    append_line(logdir / f"progress_rank{rank}.txt", f"attempt {attempt()}")
    train, valid = datasets()
    model = make_model(args.hidden)
    engine = dl.DistributedDataParallelEngine() if args.engine == "ddp" else dl.DeviceEngine("cpu")
    fault = Fault(args, logdir)
    runner = FaultRunner(fault)
    runner.train(
        model=model,
        loaders={
            "train": DataLoader(train, batch_size=args.batch_size, shuffle=True),
            "valid": DataLoader(valid, batch_size=args.batch_size),
        },
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        engine=engine,
        callbacks={
            "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "accuracy": dl.AccuracyCallback(input_key="logits", target_key="targets"),
            "checkpoint": checkpoint,
            "progress": Progress(logdir, args.pace),
        },
        loggers={"csv": dl.CSVLogger(logdir=str(logdir))},
        num_epochs=args.epochs,
    )
    if rank == 0:
        weights = {
            k: v.tolist() for k, v in runner.engine.unwrap(runner.model).state_dict().items()
        }
        (logdir / "final_weights.json").write_text(json.dumps(weights))
    done = logdir / f"done_rank{rank}"
    done.with_suffix(".part").write_text(str(os.getpid()))
    done.with_suffix(".part").replace(done)  # whole or absent: rank 1 reads the pid in it
    fault.maybe_fire_at_end(rank)
    return runner


if __name__ == "__main__":
    main(sys.argv[1:])
