"""Writes ``last.pth`` (step 1) synchronously, then starts an asynchronous save of step 2 whose
writer streams slowly; prints "writing" once half of it is on disk and keeps training. The test
kills this process with SIGKILL at that point.

    python killed_writer.py FOLDER
"""

import sys
import time
from pathlib import Path

import torch

import ddprun.checkpoint_manifest as manifest
from ddprun.engines.engine import IEngine

folder = Path(sys.argv[1])
engine = IEngine("cpu")
engine.save_checkpoint({"step": 1, "w": torch.full((1 << 20,), 1.0)}, folder / "last.pth")
real_write = manifest.HashingWriter.write


def slow_write(self, data):
    written = real_write(self, data)
    if self.size > 2 << 20:  # half of the 4 MiB tensor is in the temporary file
        print("writing", flush=True)
        time.sleep(60)
    return written


manifest.HashingWriter.write = slow_write
engine.save_checkpoint(
    {"step": 2, "w": torch.full((1 << 20,), 2.0)}, folder / "last.pth", async_=True
)
while True:  # "training" goes on while the writer works
    time.sleep(0.05)
