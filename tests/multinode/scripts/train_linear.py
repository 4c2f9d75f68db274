"""A tiny deterministic DDP training run for the multi-node and SLURM tests.

    ddprun --nproc 2 train_linear.py --logdir DIR [--out DIR] [--epochs N] [--batch-sleep S]

A Linear(8, 1) regression on a fixed TensorDataset (256 samples, batches of 4: 32 steps per
epoch with 2 ranks), unshuffled, SGD, so every layout of the same world size (1 node x 2
processes, 2 nodes x 1 process) must end with the same weights.
Every rank writes ``<out>/rank<R>.json`` (default out: ``<logdir>/final``): its launcher
variables and host when the stage starts, and its final weights at the end.
Checkpoints and CSV rows go to ``--logdir`` (rank 0 only). ``--batch-sleep`` slows each
training batch down (and makes rank 0 write its global batch step to ``<out>/progress``),
so a test can interrupt the run in the middle of an epoch.
"""

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

torch.set_num_threads(1)

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ROLE_RANK",
               "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_NODEID")  # fmt: skip


def datasets() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=generator)
    w = torch.arange(1.0, 9.0).unsqueeze(1) / 8
    y = x @ w + 0.05 * torch.randn(320, 1, generator=generator)
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


class Dump(dl.Callback):
    """Every rank writes its launcher variables when the run starts and its weights at the end."""

    def __init__(self, out: Path, batch_sleep: float) -> None:
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out, self.batch_sleep = out, batch_sleep

    def _write(self, runner, weights: bool) -> None:
        record = {name: os.environ.get(name) for name in LAUNCH_VARS}
        record.update(host=socket.gethostname(), pid=os.getpid(), engine_rank=runner.engine.rank)
        record["world_size"] = runner.engine.world_size
        if weights:
            model = runner.engine.unwrap(runner.model)
            record["weights"] = {k: v.tolist() for k, v in model.state_dict().items()}
            record["global_sample_step"] = runner.global_sample_step
        path = self.out / f"rank{max(runner.engine.rank, 0)}.json"
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(record))
        os.replace(temp, path)

    def on_stage_start(self, runner) -> None:
        self._write(runner, weights=False)

    def on_batch_start(self, runner) -> None:
        if self.batch_sleep and runner.is_train_loader:
            time.sleep(self.batch_sleep)  # before the step, so a stop lands inside the epoch

    def on_batch_end(self, runner) -> None:
        if self.batch_sleep and runner.is_train_loader and runner.engine.is_master:
            (self.out / "progress").write_text(str(runner.global_batch_step))

    def on_experiment_end(self, runner) -> None:
        self._write(runner, weights=True)


class LinearRunner(dl.Runner):
    def handle_batch(self, batch) -> None:
        x, y = batch
        self.batch = {"features": x, "targets": y, "logits": self.model(x)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sleep", type=float, default=0.0)
    args = parser.parse_args()
    out = Path(args.out or Path(args.logdir) / "final")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    train, valid = datasets()
    LinearRunner().train(
        model=model,
        criterion=torch.nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        loaders={
            "train": DataLoader(train, batch_size=4, shuffle=False),
            "valid": DataLoader(valid, batch_size=32),
        },
        engine=dl.DistributedDataParallelEngine(),
        callbacks=[
            dl.CriterionCallback("logits", "targets"),
            dl.OptimizerCallback(),
            dl.CheckpointCallback(args.logdir, loader_key="valid", metric_key="loss"),
            Dump(out, args.batch_sleep),
        ],
        loggers={"csv": dl.CSVLogger(args.logdir)},
        num_epochs=args.epochs,
    )


if __name__ == "__main__":
    main()
