"""Records where each rank agrees on the stop flag; run through ``ddprun --nproc 2``.

Rank 1 aims at twice rank 0's `stop_check_seconds`, so the ranks propose different numbers of
batches to the next agreement; every rank must still agree at the same batches. Two train
loaders of different lengths per epoch, and two stages, so the count runs across loader ends,
epochs and stages. With ``--signal-at N``, rank 0 alone sends itself SIGTERM at its global
batch N: every rank must stop at the same batch.

Each agreement is appended to ``OUT/rank<R>.jsonl`` as it happens (a rank may be stopped by the
launcher before it could write anything at its end).

    ddprun --nproc 2 stop_interval.py --out DIR [--signal-at N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


class RecordingEngine(dl.DistributedDataParallelEngine):
    """The DDP engine, writing the global batch, proposal and answer of every agreement."""

    def __init__(self, runner: dl.IRunner, out: Path) -> None:
        super().__init__(backend="gloo")
        self.runner, self.out = runner, out

    def agree_to_stop(self, signum, every=1):
        answer = super().agree_to_stop(signum, every)
        record = [self.runner.stage_key, self.runner.global_batch_step, every, *answer]
        with open(self.out / f"rank{self.rank}.jsonl", "a") as stream:
            stream.write(json.dumps(record) + "\n")
        return answer


class SlowRunner(dl.IRunner):
    def __init__(self, out: Path, signal_at: int | None) -> None:
        super().__init__()
        self.out, self.signal_at = out, signal_at
        self.stop_check_max_batches = 32
        self.stop_check_seconds = 0.05 * (1 + int(os.environ["RANK"]))

    @property
    def stages(self) -> list[str]:
        return ["one", "two"]

    def get_stage_len(self, stage: str) -> int:
        return 2 if stage == "one" else 1

    def get_engine(self):
        return RecordingEngine(self, self.out)

    def get_loggers(self):
        return {}

    def get_loaders(self, stage: str):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(1024, 4, generator=generator), torch.randn(1024, 1, generator=generator)
        )
        return {
            "train_a": DataLoader(data, batch_size=8),  # 64 batches per rank
            "train_b": DataLoader(torch.utils.data.Subset(data, range(200)), batch_size=8),
            "valid": DataLoader(data, batch_size=256),
        }

    def get_model(self, stage: str):
        torch.manual_seed(0)
        return nn.Linear(4, 1)

    def get_criterion(self, stage: str):
        return nn.MSELoss()

    def get_optimizer(self, stage: str, model):
        return torch.optim.SGD(model.parameters(), lr=0.01)

    def get_callbacks(self, stage: str):
        return {
            "criterion": dl.CriterionCallback(
                input_key="logits", target_key="targets", metric_key="loss"
            ),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "checkpoint": dl.CheckpointCallback(
                logdir=str(self.out), loader_key="valid", metric_key="loss"
            ),
        }

    def handle_batch(self, batch) -> None:
        x, y = batch
        time.sleep(0.002)
        if self.engine.rank == 0 and self.global_batch_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.batch = {"features": x, "targets": y, "logits": self.model(x)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--signal-at", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runner = SlowRunner(Path(args.out), args.signal_at)
    runner.run()
    (Path(args.out) / f"rank{runner.engine.rank}.done").write_text(str(runner.global_batch_step))


if __name__ == "__main__":
    main()
