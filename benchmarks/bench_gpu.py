"""GPU throughput, plain loop vs ddprun, in fp32, bf16 and fp16 (ddprun: ``dl.AMPEngine``),
and host syncs per train step. Prints "skipped: no GPU" without CUDA.

Models: a small conv net on 3x32x32 inputs and the 256-512-512-10 MLP. The batches are made on
the GPU up front (a list of batches is the loader of both), so the numbers show the framework's
cost, not the input pipeline's. For each model and precision: alternating plain/ddprun runs,
median samples per second (CUDA-synchronized before the first and after the last train step),
and in one extra run each, the host syncs inside the train loop counted with
``torch.cuda.set_sync_debug_mode("warn")`` (one warning per synchronizing call).

    python benchmarks/bench_gpu.py [--quick] [--device cuda|cpu]

``--device cpu --steps 4 --batch-size 16`` runs the same code on the CPU (bf16/fp16 autocast,
no sync counting), which only checks that the benchmark itself works.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import bench_common as bc
import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
GPU_MODELS = ("conv", "mlp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_gpu_model(name: str) -> nn.Module:
    if name == "conv":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 10),
        )
    return bc.make_model("mlp")


def make_batches(name: str, steps: int, batch: int, device: str) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(0)
    shape = (3, 32, 32) if name == "conv" else (256,)
    x = torch.randn(steps * batch, *shape, generator=gen)
    y = torch.randint(0, 10, (steps * batch,), generator=gen)
    x, y = x.to(device), y.to(device)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, steps * batch, batch)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _SyncCounter:
    """Counts the sync-debug warnings raised between `start()` and `stop()`."""

    def __init__(self, device: str, enabled: bool) -> None:
        self.device, self.enabled = device, enabled and device.startswith("cuda")
        self.count = 0
        self._records: list[warnings.WarningMessage] | None = None
        self._mark = 0

    def bind(self, records: list[warnings.WarningMessage]) -> None:
        self._records = records

    def start(self) -> None:
        if self.enabled:
            self._mark = len(self._records or [])
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode(0)
            new = (self._records or [])[self._mark :]
            self.count += sum("synchroniz" in str(w.message).lower() for w in new)


@contextlib.contextmanager
def _capture(counter: _SyncCounter) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        counter.bind(records)
        yield


def plain_gpu(
    model_name: str, batches: list, precision: str, device: str, count_syncs: bool
) -> dict[str, float]:
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    model = make_gpu_model(model_name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    dtype = DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device.split(":")[0]) if precision == "fp16" else None
    counter = _SyncCounter(device, count_syncs)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    model.train()
    bar = tqdm(total=len(batches), desc="train", dynamic_ncols=True)
    last_refresh = 0.0
    with _capture(counter):
        _sync(device)
        start = time.perf_counter()
        counter.start()
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                logits = model(x)
                loss = criterion(logits, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                correct = logits.argmax(dim=1).eq(y).sum()
                accuracy = correct / y.shape[0]
                sums[0] += loss.detach() * y.shape[0]
                sums[1] += correct
                sums[2] += y.shape[0]
            bar.update(1)
            now = time.monotonic()
            if now - last_refresh >= 0.5:
                last_refresh = now
                bar.set_postfix({"loss": f"{float(loss):.4g}", "acc": f"{float(accuracy):.4g}"})
        counter.stop()
        _sync(device)
        elapsed = time.perf_counter() - start
    bar.close()
    samples = sum(int(y.shape[0]) for _, y in batches)
    return {"samples_per_s": samples / elapsed, "syncs_per_step": counter.count / len(batches)}


def ddprun_gpu(
    model_name: str, batches: list, precision: str, device: str, count_syncs: bool
) -> dict[str, float]:
    from ddprun import dl

    counter = _SyncCounter(device, count_syncs)

    class Probe(dl.Callback):
        def __init__(self) -> None:
            super().__init__(order=10_000)
            self.elapsed = 0.0

        def on_loader_start(self, runner: Any) -> None:
            _sync(device)
            self._start = time.perf_counter()
            counter.start()

        def on_batch_end(self, runner: Any) -> None:
            if runner.loader_batch_step == runner.loader_batch_len:
                counter.stop()
                _sync(device)
                self.elapsed = time.perf_counter() - self._start

    torch.manual_seed(0)
    model = make_gpu_model(model_name)
    if precision == "fp32":
        engine = dl.DeviceEngine(device)
    else:
        engine = dl.AMPEngine(device=device, dtype=DTYPES[precision])
    probe = Probe()
    with _capture(counter):
        bc._runner_class(dl)().train(
            model=model,
            criterion=nn.CrossEntropyLoss(),
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            loaders={"train": batches},
            engine=engine,
            callbacks={
                "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
                "optimizer": dl.OptimizerCallback(metric_key="loss"),
                "accuracy": dl.AccuracyCallback(input_key="logits", target_key="targets"),
                "tqdm": dl.TqdmCallback(),
                "_probe": probe,
            },
            loggers={},
            num_epochs=1,
        )
    samples = sum(int(y.shape[0]) for _, y in batches)
    return {
        "samples_per_s": samples / probe.elapsed,
        "syncs_per_step": counter.count / len(batches),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (a dry run)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="train steps per run")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        bc.log("skipped: no GPU")
        bc.emit({"section": "gpu", "skipped": "no GPU"})
        return
    if device == "cpu":
        torch.set_num_threads(1)
    steps = args.steps or (30 if args.quick else 300)
    batch = args.batch_size
    reps = args.reps or (2 if args.quick else 5)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    for model_name in GPU_MODELS:
        batches = make_batches(model_name, steps, batch, device)
        for precision in PRECISIONS:
            with bc.quiet():
                warm = batches[: max(5, steps // 10)]
                plain_gpu(model_name, warm, precision, device, False)
                ddprun_gpu(model_name, warm, precision, device, False)
                plain, ours = [], []
                for rep in range(reps):
                    order = ("plain", "ddprun") if rep % 2 == 0 else ("ddprun", "plain")
                    for kind in order:
                        fn = plain_gpu if kind == "plain" else ddprun_gpu
                        result = fn(model_name, batches, precision, device, False)
                        (plain if kind == "plain" else ours).append(result["samples_per_s"])
                plain_syncs = plain_gpu(model_name, batches, precision, device, True)
                ours_syncs = ddprun_gpu(model_name, batches, precision, device, True)
            counted = device.startswith("cuda")
            bc.emit(
                {
                    "section": "gpu",
                    "device": name,
                    "model": model_name,
                    "precision": precision,
                    "batch_size": batch,
                    "steps": steps,
                    "reps": reps,
                    "plain_samples_per_s": bc.median(plain),
                    "ddprun_samples_per_s": bc.median(ours),
                    # time ratio ddprun/plain (> 1: ddprun slower), from paired runs
                    "ratio": bc.median([p / o for p, o in zip(plain, ours)]),
                    "plain_syncs_per_step": plain_syncs["syncs_per_step"] if counted else None,
                    "ddprun_syncs_per_step": ours_syncs["syncs_per_step"] if counted else None,
                }
            )


if __name__ == "__main__":
    main()
