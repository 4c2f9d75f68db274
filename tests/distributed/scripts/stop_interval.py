"""Records where each rank agrees on the stop flag; run through ``ddprun --nproc 2``.

Rank 1 aims at twice rank 0's `stop_check_seconds`, so the ranks propose different numbers of
batches to the next agreement; every rank must still agree at the same batches. With ``--signal-at N``, rank 0 alone sends
itself SIGTERM at its global batch N: every rank must stop at the same batch.

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
    """The DDP engine, noting the global batch of every stop agreement and its answer."""

    def __init__(self, runner_ref: list) -> None:
        super().__init__(backend="gloo")
        self.runner_ref = runner_ref
        self.agreements: list[list] = []

    def agree_to_stop(self, signum, every=1):
        answer = super().agree_to_stop(signum, every)
        runner = self.runner_ref[0]
        self.agreements.append([runner.global_batch_step, every, *answer])
        return answer


class SlowRunner(dl.Runner):
    def __init__(self, signal_at: int | None) -> None:
        super().__init__()
        self.signal_at = signal_at

    def handle_batch(self, batch) -> None:
        x, y = batch
        time.sleep(0.004)
        rank = self.engine.rank
        if self.signal_at is not None and rank == 0 and self.global_batch_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.batch = {"features": x, "targets": y, "logits": self.model(x)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--signal-at", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(512, 4, generator=generator), torch.randn(512, 1, generator=generator)
    )
    loaders = {"train": DataLoader(data, batch_size=4), "valid": DataLoader(data, batch_size=64)}
    runner = SlowRunner(args.signal_at)
    runner.stop_check_max_batches = 32
    engine = RecordingEngine([runner])
    runner.stop_check_seconds = 0.05 * (1 + int(os.environ["RANK"]))
    model = nn.Linear(4, 1)
    out = Path(args.out)
    code = 0
    try:
        runner.train(
            model=model,
            criterion=nn.MSELoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loaders=loaders,
            engine=engine,
            logdir=str(out / "logs"),
            callbacks=[
                dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
                dl.OptimizerCallback(metric_key="loss"),
            ],
            num_epochs=2,
            verbose=False,
            loggers={},
        )
    except SystemExit as stopped:
        code = stopped.code
    rank = engine.rank
    (out / f"rank{rank}.json").write_text(
        json.dumps({"agreements": engine.agreements, "global_batch_step": runner.global_batch_step})
    )
    raise SystemExit(code)


if __name__ == "__main__":
    main()
