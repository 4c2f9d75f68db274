"""Training with DataLoader worker processes, for the preemption tests (test_preemption_workers).

    ddprun --nproc 2 preempt_workers.py --logdir DIR [--workers 2] [--persistent]
        [--context fork|spawn] [--pace 0.03]
    python preempt_workers.py --logdir DIR --engine device ...      (one process, DeviceEngine)

An MLP on a fixed TensorDataset (train 512 samples shuffled, valid 64, batches of 8), both loaders with
--workers worker processes started by --context, a CheckpointCallback that writes ``last.pth``
only on a stop (no periodic saves) and at epoch ends.

What it leaves in --logdir for the test:

- ``progress_rank<R>.txt``: ``epoch E step S`` after every train batch (E: global epoch,
  S: batch within the train loader, 1 to 32 per rank with 2 ranks);
- ``loader_workers/<pid>``: one empty file per DataLoader worker process, written by the user's
  own ``worker_init_fn`` (a module-level class, so it pickles for spawn), which also shows that
  ddprun leaves the user's init function in place.

``--pace S`` sleeps S seconds in each train step so the test can signal mid-epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

NUM_FEATURES, NUM_CLASSES = 8, 4


class RecordWorker:
    """The user's worker_init_fn: record this worker's pid in a folder."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        Path(self.folder, str(os.getpid())).touch()


class Progress(dl.Callback):
    """Appends ``epoch E step S`` after every train batch."""

    def __init__(self, logdir: Path) -> None:
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.logdir = logdir

    def on_batch_end(self, runner: Any) -> None:
        if not runner.is_train_loader:
            return
        rank = max(runner.engine.rank, 0)
        with (self.logdir / f"progress_rank{rank}.txt").open("a") as stream:
            stream.write(f"epoch {runner.global_epoch_step} step {runner.loader_batch_step}\n")


class Classifier(dl.Runner):
    def __init__(self, pace: float) -> None:
        super().__init__()
        self.pace = pace

    def handle_batch(self, batch: Any) -> None:
        if self.is_train_loader:
            # a slow train step, so the test can signal mid-epoch; inside the step, so the
            # runner's stop-agreement interval (measured step time) accounts for it
            time.sleep(self.pace)
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}


def loader(dataset: TensorDataset, args: argparse.Namespace, shuffle: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=8,
        shuffle=shuffle,
        num_workers=args.workers,
        persistent_workers=args.persistent,
        multiprocessing_context=args.context,
        worker_init_fn=RecordWorker(str(Path(args.logdir) / "loader_workers")),
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--engine", choices=["ddp", "device"], default="ddp")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--context", choices=["fork", "spawn", "forkserver"], default="fork")
    parser.add_argument("--pace", type=float, default=0.03)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logdir = Path(args.logdir)
    (logdir / "loader_workers").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(576, NUM_FEATURES, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (576,), generator=generator)
    train, valid = TensorDataset(x[:512], y[:512]), TensorDataset(x[512:], y[512:])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    engine = dl.DistributedDataParallelEngine() if args.engine == "ddp" else dl.DeviceEngine("cpu")
    Classifier(args.pace).train(
        model=model,
        loaders={"train": loader(train, args, True), "valid": loader(valid, args, False)},
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        engine=engine,
        callbacks={
            "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "checkpoint": dl.CheckpointCallback(logdir, loader_key="valid", metric_key="loss"),
            "progress": Progress(logdir),
        },
        num_epochs=args.epochs,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
