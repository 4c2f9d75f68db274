"""A process that owns shielded DataLoader workers and leaves with ``os._exit`` (as a rank does
after a stop, see ddprun.distributed.exit_process), for test_preemption_workers.

    python loader_owner_exit.py FOLDER [fork|spawn]

Starts a persistent loader with two workers (each records its pid in FOLDER, through the user's
worker_init_fn), reads one batch, writes FOLDER/ready, then ends with ``os._exit(143)``: no
atexit, no DataLoader shutdown. The workers must go at once (parent-death signal), not after
torch's 5 s watchdog.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun.data.workers import shield_loader_workers


class RecordWorker:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        Path(self.folder, str(os.getpid())).touch()


def main(folder: Path, method: str) -> None:
    (folder / "loader_workers").mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        TensorDataset(torch.arange(16.0)),
        batch_size=2,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=method,
        worker_init_fn=RecordWorker(str(folder / "loader_workers")),
    )
    shield_loader_workers({"train": loader})
    batches = iter(loader)
    next(batches)
    next(batches)  # both workers have run their init function by now
    (folder / "ready").touch()
    os._exit(143)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "fork")
