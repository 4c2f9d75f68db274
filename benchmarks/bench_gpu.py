"""GPU throughput of the hand-written loop and ddprun (``dl.AMPEngine`` below fp32) in fp32,
bf16 and fp16, and host syncs per train step; "skipped: no GPU" without CUDA.

Both sides are bench_common's full-workload loops (`plain_train` with autocast, and a
GradScaler for fp16; `ddprun_train` with the engine) on a small conv net and the MLP, one epoch
over batches made on the device up front (the framework, not the input pipeline). `GpuClock`
synchronizes at the first and last train step; one extra run of each side counts the train
loop's host syncs with ``torch.cuda.set_sync_debug_mode("warn")`` (a warning per sync).
``--device cpu --steps 4 --batch-size 16`` runs the same code on the CPU, as a check.

    python benchmarks/bench_gpu.py [--quick] [--device cuda|cpu] [--steps N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from typing import Any

import bench_common as bc
import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class GpuClock(bc.StepClock):
    """A StepClock that waits for the device at its ends and, with `count`, turns on CUDA's
    sync warnings for the train loop (read by `syncs`)."""

    def __init__(self, device: str, count: bool = False) -> None:
        super().__init__()
        self.cuda = device.startswith("cuda")
        self.count = count and self.cuda

    def sync(self, starting: bool) -> None:
        if self.cuda:
            if self.count and not starting:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            if self.count and starting:
                torch.cuda.set_sync_debug_mode("warn")


def make_batches(model: str, steps: int, batch: int, device: str) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(0)
    shape = (3, 32, 32) if model == "conv" else (256,)
    x = torch.randn(steps * batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (steps * batch,), generator=gen).to(device)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, steps * batch, batch)]


def one_run(kind: str, model: str, batches: list, precision: str, device: str, count: bool):
    """One epoch of `kind` over `batches`: its result, and its host syncs per step if counted."""
    from ddprun import dl

    work, clock, loaders = bc.Workload(epochs=1), GpuClock(device, count), {"train": batches}
    dtype = DTYPES[precision]
    with (
        tempfile.TemporaryDirectory() as logdir,
        bc.quiet(),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        if kind == "plain":
            result = bc.plain_train(work, model, logdir, False, device, clock, loaders, dtype)
        else:
            engine = dl.AMPEngine(device=device, dtype=dtype) if dtype else dl.DeviceEngine(device)
            result = bc.ddprun_train(work, model, logdir, engine, False, clock, loaders)
    return result, sum("synchroniz" in str(w.message).lower() for w in caught) / len(batches)


def _timed(kind: str, model: str, batches: list, precision: str, device: str) -> Any:
    """`kind`'s run for `bc.alternate`: the first train_samples / batch_size batches."""
    part = lambda w: batches[: w.train_samples // w.batch_size]  # noqa: E731
    return lambda w: one_run(kind, model, part(w), precision, device, False)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (a check of the code)")
    parser.add_argument("--reps", type=int, default=None, help="pairs (default 5, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="train steps per run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--models", default="conv,mlp")
    args = parser.parse_args(argv)
    device, batch = args.device, args.batch_size
    if device.startswith("cuda") and not torch.cuda.is_available():
        bc.log("skipped: no GPU")
        return bc.emit({"section": "gpu", "skipped": "no GPU"})
    torch.set_num_threads(1)
    steps = args.steps or (30 if args.quick else 300)
    counted = device.startswith("cuda")
    name = torch.cuda.get_device_name() if counted else "cpu"
    work = bc.Workload(epochs=1, train_samples=steps * batch, batch_size=batch)
    for model in args.models.split(","):
        batches = make_batches(model, steps, batch, device)
        for precision in DTYPES:
            kinds = ("plain", "ddprun")
            runs = {k: _timed(k, model, batches, precision, device) for k in kinds}
            found = bc.alternate(runs, work, args.reps or (2 if args.quick else 5))
            time = bc.ratios(found["ddprun"], found["plain"], "step_s")
            syncs = {
                f"{k}_syncs": one_run(k, model, batches, precision, device, True)[1] for k in kinds
            }
            if not counted:  # sync warnings exist on CUDA only
                syncs = dict.fromkeys(syncs)
            record = {"section": "gpu", "model": model, "precision": precision, "steps": steps}
            record.update(device=name, batch_size=batch, ratio=time["ratio"], **syncs)
            speeds = {
                f"{k}_samples_per_s": batch / time[side] for k, side in zip(kinds, ("ref", "ours"))
            }
            bc.emit({**record, **speeds})


if __name__ == "__main__":
    main()
