"""The training script of the FSDP tests: the same run on FSDP, DDP or one process.

    ddprun --nproc 2 train.py --engine fsdp --logdir DIR [options]
    python train.py --engine device --logdir DIR          (one process, batch x2)

An MLP (or a dict of two: encoder and head) on a fixed TensorDataset (256 train samples,
shuffled; 64 valid), Adam (or SGD with momentum), criterion, optimizer (accumulation, clipping),
accuracy and checkpoint callbacks (``--leave-at N`` leaves each train loader after batch N, so an
accumulation window can be open at its end). It leaves in --logdir:

- ``metrics.json`` (rank 0): the last epoch's metrics of every loader;
- ``final_weights.json`` (rank 0): the model's full state dict as lists (a dict model: keys
  prefixed ``<key>.``), read from ``runner.model`` after ``train`` returned;
- ``evaluated.json`` (rank 0, with ``--evaluate``): ``runner.evaluate_loader`` on the valid
  set after ``train``;
- ``progress_rank<R>.txt`` and ``fault_rank<R>.txt``, as tests/faults/scripts/train.py does,
  for the killed-rank test (``--fault-batch``: rank 1 SIGKILLs itself at that global batch on
  the first attempt); ``--pace S`` sleeps S seconds after every train batch (a test signals
  the launcher meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

NUM_FEATURES, NUM_CLASSES = 8, 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--engine", choices=["fsdp", "ddp", "device"], default="fsdp")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--dict-model", action="store_true", help="{encoder, head}")
    parser.add_argument("--freeze-first", action="store_true", help="freeze the first layer")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=0.0, help="max global grad norm")
    parser.add_argument("--param-dtype", default=None)
    parser.add_argument("--reduce-dtype", default=None)
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--evaluate", action="store_true", help="evaluate_loader after train")
    parser.add_argument("--sgd", action="store_true")
    parser.add_argument(
        "--leave-at", type=int, default=0, help="leave each train loader after this batch"
    )
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--async-save", action="store_true", help="CheckpointCallback(async_save)")
    parser.add_argument("--fault-batch", type=int, default=0, help="SIGKILL rank 1 there")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds after each train batch")
    return parser.parse_args(argv)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, NUM_FEATURES, generator=generator)
    w = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
    y = (x @ w + 0.5 * torch.randn(320, NUM_CLASSES, generator=generator)).argmax(dim=1)
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def make_model(args: argparse.Namespace) -> Any:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    head = nn.Linear(16, NUM_CLASSES)
    if args.freeze_first:
        encoder[0].requires_grad_(False)
    if args.dict_model:
        return {"encoder": encoder, "head": head}
    return nn.Sequential(*encoder, head)


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def append_line(path: Path, line: str) -> None:
    with path.open("a") as stream:
        stream.write(line + "\n")


class Progress(dl.Callback):
    """``rank R batch B`` after every train batch (after the checkpoint callback)."""

    def __init__(self, logdir: Path, pace: float) -> None:
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.logdir, self.pace = logdir, pace

    def on_batch_end(self, runner: Any) -> None:
        if runner.is_train_loader:
            rank = max(runner.engine.rank, 0)
            line = f"rank {rank} batch {runner.global_batch_step}"
            append_line(self.logdir / f"progress_rank{rank}.txt", line)
            time.sleep(self.pace)  # pacing only, so a test can signal mid-training


class LeaveEarly(dl.Callback):
    """Leaves the train loader after batch N: an accumulation window may still be open."""

    def __init__(self, batch: int) -> None:
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.batch = batch

    def on_batch_end(self, runner: Any) -> None:
        if runner.is_train_loader and runner.loader_batch_step == self.batch:
            runner.need_early_stop = True


class ScriptRunner(dl.Runner):
    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        super().__init__()
        self.args, self.logdir = args, logdir

    def handle_batch(self, batch: Any) -> None:
        rank = max(self.engine.rank, 0)
        if (
            self.is_train_loader
            and self.args.fault_batch
            and rank == 1
            and attempt() == 0
            and self.global_batch_step == self.args.fault_batch
        ):
            (self.logdir / f"fault_rank{rank}.txt").write_text(f"sigkill {time.time()!r}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        features, targets = batch
        if isinstance(self.model, dict):
            logits = self.model["head"](self.model["encoder"](features))
        else:
            logits = self.model(features)
        self.batch = {"features": features, "targets": targets, "logits": logits}


def make_engine(args: argparse.Namespace) -> Any:
    if args.engine == "fsdp":
        return dl.FSDPEngine(
            param_dtype=args.param_dtype,
            reduce_dtype=args.reduce_dtype,
            cpu_offload=args.cpu_offload,
        )
    if args.engine == "ddp":
        return dl.DistributedDataParallelEngine()
    return dl.DeviceEngine("cpu")


def main(argv: list[str] | None = None) -> ScriptRunner:
    args = parse_args(argv)
    torch.set_num_threads(1)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    append_line(logdir / f"progress_rank{rank}.txt", f"attempt {attempt()}")
    train, valid = datasets()
    batch = args.batch_size * (2 if args.engine == "device" else 1)
    model = make_model(args)
    params = (
        [p for m in model.values() for p in m.parameters()]
        if isinstance(model, dict)
        else list(model.parameters())
    )
    if args.sgd:
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(params, lr=0.01)
    clip = {"grad_clip_fn": "clip_grad_norm_", "grad_clip_params": {"max_norm": args.clip}}
    callbacks = {
        "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
        "optimizer": dl.OptimizerCallback(
            metric_key="loss",
            accumulation_steps=args.accumulate,
            **(clip if args.clip else {}),
        ),
        "accuracy": dl.AccuracyCallback(input_key="logits", target_key="targets", topk_args=(1,)),
        "checkpoint": dl.CheckpointCallback(
            logdir / "run",
            loader_key="valid",
            metric_key="loss",
            save_n_best=2,
            resume=args.resume,
            save_every_n_batches=args.save_every or None,
            async_save=args.async_save,
        ),
        "progress": Progress(logdir, args.pace),
    }
    if args.leave_at:
        callbacks["leave"] = LeaveEarly(args.leave_at)
    runner = ScriptRunner(args, logdir)
    runner.train(
        model=model,
        loaders={
            "train": DataLoader(train, batch_size=batch, shuffle=True),
            "valid": DataLoader(valid, batch_size=batch),
        },
        criterion=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        engine=make_engine(args),
        callbacks=callbacks,
        loggers={},
        num_epochs=args.epochs,
    )
    if rank == 0:
        write_results(runner, logdir)
    if args.evaluate:  # the engine shards the (now plain) model again, on every rank
        valid_loader = DataLoader(valid, batch_size=batch)
        evaluated = runner.evaluate_loader(loader=valid_loader, callbacks=callbacks_for_eval())
        if rank == 0:
            (logdir / "evaluated.json").write_text(json.dumps(evaluated))
    return runner


def callbacks_for_eval() -> dict[str, Any]:
    return {
        "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
        "accuracy": dl.AccuracyCallback(input_key="logits", target_key="targets", topk_args=(1,)),
    }


def write_results(runner: ScriptRunner, logdir: Path) -> None:
    model = runner.model
    named = model.items() if isinstance(model, dict) else [("", model)]
    weights = {}
    for key, module in named:
        for name, value in module.state_dict().items():
            weights[f"{key}.{name}" if key else name] = value.tolist()
    (logdir / "final_weights.json").write_text(json.dumps(weights))
    metrics = {"epoch_metrics": runner.epoch_metrics}
    (logdir / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
