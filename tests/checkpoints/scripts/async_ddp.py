"""Asynchronous saves under real DDP: every rank saves, trains on, then loads.

    ddprun --nproc 2 async_ddp.py --out DIR [--delay 1.0]

Rank 0's writes sleep `--delay` seconds first, so the other rank reaches the next save or the
load long before the file is complete; each rank writes ``rank<R>.json`` with what it saw.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import ddprun.checkpoint as ckpt_io
from ddprun.checkpoint_manifest import verify
from ddprun.engines.ddp import DistributedDataParallelEngine

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--delay", type=float, default=1.0)
args = parser.parse_args()
out = Path(args.out)
real_save_targets = ckpt_io.save_targets


def slow_save_targets(obj, paths):
    time.sleep(args.delay)
    return real_save_targets(obj, paths)


ckpt_io.save_targets = slow_save_targets
engine = DistributedDataParallelEngine()
engine.setup()
blocked = []
for step in (1, 2, 3):
    state = {"step": step, "w": torch.full((1 << 20,), float(step))}
    start = time.monotonic()
    engine.save_checkpoint(state, [out / "last.pth", out / f"epoch.{step}.pth"], async_=True)
    blocked.append(time.monotonic() - start)
    state["w"].add_(100.0)  # training goes on and changes the weights
loaded = engine.load_checkpoint(out / "last.pth")  # waits for step 3's write on every rank
report = {
    "rank": engine.rank,
    "blocked": blocked,
    "loaded_step": loaded["step"],
    "loaded_w_ok": bool(torch.equal(loaded["w"], torch.full((1 << 20,), 3.0))),
    "problems": [p for s in (1, 2, 3) for p in verify(out / f"epoch.{s}.pth", True)]
    + verify(out / "last.pth", require_manifest=True),
}
(out / f"rank{engine.rank}.json").write_text(json.dumps(report))
engine.save_checkpoint({"step": 4}, out / "last.pth", async_=True)
engine.wait_for_checkpoint()  # the end of the run
assert ckpt_io.load_checkpoint(out / "last.pth")["step"] == 4
engine.teardown()
