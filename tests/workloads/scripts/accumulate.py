"""Gradient accumulation with a per-step scheduler, mid-epoch checkpoints and faults.

    python accumulate.py --logdir DIR --engine device [--iterable] ...     (one process)
    ddprun --nproc 2 accumulate.py --logdir DIR --save-every 2 --fault sigkill ...

An MLP on a fixed classification set, Adam, OptimizerCallback(accumulation_steps=--accumulation),
a StepLR stepped by SchedulerCallback(mode=--scheduler) and a CheckpointCallback writing last.pth
every --save-every train batches. ``--stop-at N`` ends every train loader after its N-th batch
(``need_early_stop``), leaving an accumulation window open at loader end under any engine.
``--iterable`` feeds the train split through an
IterableDataset (a loader without ``len``), in order; without it the train loader is a sized
DataLoader over the same samples (shuffled with ``--shuffle``).

Left in --logdir: ``progress_rank<R>.txt`` (``attempt A`` at start, then ``batch B`` per train
batch, B the global batch step, written after the checkpoint callback), ``final_rank<R>.pt``
(the model's state dict and the optimizer's learning rate) once training returned.

Faults (on --fault-rank, inside handle_batch at global train batch --fault-batch; with
--first-attempt-only only while TORCHELASTIC_RESTART_COUNT is 0): ``raise`` or ``sigkill``.

`main(argv)` also runs in-process (``--engine device``) and returns the runner; its `records`
callback keeps, per train batch, ``(epoch, batch, lr)``, per train loader end whether every
parameter's gradient is None afterwards, and the gradients found at the run's first train batch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ddprun import dl

NUM_FEATURES, NUM_CLASSES = 8, 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--engine", choices=["ddp", "device"], default="ddp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=3)
    parser.add_argument(
        "--scheduler",
        choices=["none", "batch", "epoch", "default"],
        default="batch",
        help="SchedulerCallback mode; 'default': a scheduler for train() and no callback",
    )
    parser.add_argument("--iterable", action="store_true", help="train loader without len")
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--stop-at", type=int, default=0, help="end train loaders after N batches")
    parser.add_argument("--save-every", type=int, default=0, help="save_every_n_batches (0: off)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    parser.add_argument("--fault", choices=["none", "raise", "sigkill"], default="none")
    parser.add_argument("--fault-rank", type=int, default=0)
    parser.add_argument("--fault-batch", type=int, default=0, help="global train batch")
    parser.add_argument("--first-attempt-only", action="store_true")
    return parser.parse_args(argv)


def datasets(train_samples: int) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    total = train_samples + 32
    x = torch.randn(total, NUM_FEATURES, generator=generator)
    w = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
    y = (x @ w + 0.5 * torch.randn(total, NUM_CLASSES, generator=generator)).argmax(dim=1)
    n = train_samples
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


class Stream(IterableDataset):
    """The samples of a TensorDataset, in order, with no ``__len__``."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        return (self.dataset[i] for i in range(len(self.dataset)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def make_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class Records(dl.Callback):
    """Per train batch ``(epoch, loader batch, lr)``; per train loader end, whether no parameter
    holds a gradient once every callback's on_loader_end ran; the gradients on the parameters
    when the first train batch starts; progress lines in the logdir."""

    def __init__(self, logdir: Path, stop_at: int) -> None:
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.logdir, self.stop_at = logdir, stop_at
        self.lrs: list[tuple[int, int, float]] = []
        self.grads_cleared: list[bool] = []
        self.first_grads: dict[str, torch.Tensor | None] | None = None

    def on_batch_start(self, runner: Any) -> None:
        if runner.is_train_loader and self.first_grads is None:
            model = runner.engine.unwrap(runner.model)
            self.first_grads = {
                name: None if p.grad is None else p.grad.clone()
                for name, p in model.named_parameters()
            }

    def on_batch_end(self, runner: Any) -> None:
        if not runner.is_train_loader:
            return
        lr = runner.optimizer.param_groups[0]["lr"]
        self.lrs.append((runner.stage_epoch_step, runner.loader_batch_step, lr))
        rank = max(runner.engine.rank, 0)
        append_line(self.logdir / f"progress_rank{rank}.txt", f"batch {runner.global_batch_step}")
        if runner.loader_batch_step == self.stop_at:
            runner.need_early_stop = True  # every rank, at the same batch

    def on_loader_end(self, runner: Any) -> None:
        if runner.is_train_loader:
            model = runner.engine.unwrap(runner.model)
            self.grads_cleared.append(all(p.grad is None for p in model.parameters()))


def append_line(path: Path, line: str) -> None:
    with path.open("a") as stream:
        stream.write(line + "\n")


class AccumulateRunner(dl.Runner):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args

    def handle_batch(self, batch: Any) -> None:
        args, rank = self.args, max(self.engine.rank, 0)
        armed = args.fault != "none" and not (args.first_attempt_only and attempt() > 0)
        hit = self.is_train_loader and self.global_batch_step == args.fault_batch
        if armed and hit and rank == args.fault_rank:
            if args.fault == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at batch {args.fault_batch}")
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}


def main(argv: list[str] | None = None) -> AccumulateRunner:
    args = parse_args(argv)
    torch.set_num_threads(1)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0")) if args.engine == "ddp" else 0
    append_line(logdir / f"progress_rank{rank}.txt", f"attempt {attempt()}")
    train, valid = datasets(args.train_samples)
    if args.iterable:
        train_loader = DataLoader(Stream(train), batch_size=args.batch_size)
    else:
        train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=args.shuffle)
    model = make_model()
    optimizer, scheduler = make_optimizer(model)
    records = Records(logdir, args.stop_at)
    callbacks = {
        "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
        "optimizer": dl.OptimizerCallback(accumulation_steps=args.accumulation),
        "checkpoint": dl.CheckpointCallback(
            logdir, resume=args.resume, save_every_n_batches=args.save_every or None
        ),
        "records": records,
    }
    if args.scheduler in ("batch", "epoch"):
        callbacks["scheduler"] = dl.SchedulerCallback(mode=args.scheduler)
    engine = dl.DistributedDataParallelEngine() if args.engine == "ddp" else dl.DeviceEngine("cpu")
    runner = AccumulateRunner(args)
    runner.records = records
    runner.train(
        model=model,
        loaders={"train": train_loader, "valid": DataLoader(valid, batch_size=args.batch_size)},
        criterion=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=scheduler if args.scheduler != "none" else None,
        engine=engine,
        callbacks=callbacks,
        loggers={},
        num_epochs=args.epochs,
    )
    state = {k: v.clone() for k, v in runner.engine.unwrap(runner.model).state_dict().items()}
    final = {"model": state, "lr": optimizer.param_groups[0]["lr"]}
    torch.save(final, logdir / f"final_rank{rank}.pt")
    return runner


if __name__ == "__main__":
    main(sys.argv[1:])
