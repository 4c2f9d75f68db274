"""Shared pieces of the benchmarks: workload, data, models, the loops compared (hand-written
PyTorch and the same work through ddprun), their timing, and helpers.

Full workload (`plain_train` / `ddprun_train`): forward, cross-entropy, backward, Adam, loss
and top-1 accuracy summed on the device, a tqdm bar (loss and accuracy at most every 0.5 s),
validation, CSV rows and last/best checkpoints per epoch; `StepClock` times each train step at
the same points on both sides. Lean workload (`lean_plain` / `lean_ddprun`): a default
``SupervisedRunner.train`` with an AccuracyCallback next to a hand loop with that per-batch
work, timed around the training call and per epoch only: no per-batch probe on either side.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

RESULT_PREFIX = "BENCH_RESULT "
MODELS = ("tiny", "mlp")


@dataclass(frozen=True)
class Workload:
    """The issue's workload; `quick()` shrinks it for smoke runs."""

    epochs: int = 3
    train_samples: int = 16384
    valid_samples: int = 4096
    features: int = 256
    classes: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def quick(self) -> Workload:
        return replace(self, epochs=1, train_samples=4096, valid_samples=1024)


def make_model(name: str, features: int = 256, classes: int = 10) -> nn.Module:
    """ "tiny": Linear(256, 10); "mlp": 256-512-512-10; "conv": a small net on 3x32x32."""
    if name == "tiny":
        return nn.Linear(features, classes)
    if name == "mlp":
        hidden = [nn.Linear(features, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU()]
        return nn.Sequential(*hidden, nn.Linear(512, classes))
    if name == "conv":
        conv = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1)]
        pool = [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
        head = [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, classes)]
        return nn.Sequential(*conv, *pool, *head)
    raise ValueError(f"unknown model {name!r}; expected tiny, mlp or conv")


def make_loaders(work: Workload, sampler: Callable | None = None) -> dict[str, DataLoader]:
    """Train and valid loaders of a learnable problem (labels: the arg-max of a fixed random
    projection); the train loader shuffles by a seeded generator, or by `sampler(data, train)`
    (the hand-written DDP loop's)."""
    gen = torch.Generator().manual_seed(work.seed)
    x = torch.randn(work.train_samples + work.valid_samples, work.features, generator=gen)
    y = (x @ torch.randn(work.features, work.classes, generator=gen)).argmax(dim=1)
    n, shuffle = work.train_samples, torch.Generator().manual_seed(work.seed)
    if sampler is None:  # as DataLoader(shuffle=True, generator=...) for train, in order else
        sampler = lambda data, train: RandomSampler(data, generator=shuffle) if train else None  # noqa: E731
    data = {"train": TensorDataset(x[:n], y[:n]), "valid": TensorDataset(x[n:], y[n:])}
    return {
        key: DataLoader(part, batch_size=work.batch_size, sampler=sampler(part, key == "train"))
        for key, part in data.items()
    }


def setup(work: Workload, model_name: str, device: str = "cpu") -> tuple[dict, nn.Module, Any]:
    """The workload's loaders, then its model (seeded, on `device`) and Adam."""
    loaders = make_loaders(work)
    torch.manual_seed(work.seed)
    model = make_model(model_name, work.features, work.classes).to(device)
    return loaders, model, torch.optim.Adam(model.parameters(), lr=work.lr)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Send stdout and stderr (progress bars, console lines) to /dev/null for a timed run."""
    with open(os.devnull, "w") as sink:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield


@dataclass
class RunResult:
    """One run. Full workload: train steps; lean: all batches (train and valid)."""

    step_s: float  # full: train-loader time / steps; lean: the training call / batches
    step_median_s: float  # full: median step interval; lean: median epoch / its batches
    cpu_step_s: float  # process CPU time per step over the span of step_s
    wall_s: float  # full: the whole training function; lean: the training call
    steps: int
    first_step_time: float = 0.0  # time.time() just before the first train batch is fetched
    valid_loss: float = math.nan
    valid_accuracy: float = math.nan
    epoch_s: list[float] = field(default_factory=list)  # lean: each epoch

    def with_valid(self, metrics: dict[str, float]) -> RunResult:
        """This result with the last loader's `loss` and `accuracy01` from `metrics`."""
        self.valid_loss = metrics.get("loss", math.nan)
        self.valid_accuracy = metrics.get("accuracy01", math.nan)
        return self


class StepClock:
    """Train-step timing at the same points for every loop: `start()` just before the first
    batch of a train loader is fetched, `end(last)` after every train batch, `stop()` after
    the loader. `pause()`, when given, runs at every `end` (lockstep: it may hand the CPU to
    the other side) and its time is left out. `sync` runs at `start` and at the last `end`
    (a GPU clock waits for the device there)."""

    def __init__(self, pause: Callable[[], None] | None = None) -> None:
        self.wall_start = time.perf_counter()
        self.intervals: list[float] = []
        self.time = self.cpu = 0.0
        self.steps = 0
        self.first_step: float | None = None
        self._pause = pause
        self._paused = self._start = self._cpu_start = self._cpu_end = 0.0
        self._ends: list[float] = []

    def sync(self, starting: bool) -> None:
        """Nothing to wait for on a CPU."""

    def start(self) -> None:
        self.sync(True)
        self.first_step = self.first_step or time.time()
        self._ends, self._paused = [], 0.0
        self._cpu_start, self._start = time.process_time(), time.perf_counter()

    def end(self, last: bool = False) -> None:
        if last:
            self.sync(False)
        self._ends.append(time.perf_counter() - self._paused)
        if last:  # process CPU time only at the loader's last batch: one syscall per epoch
            self._cpu_end = time.process_time()
        if self._pause is not None:
            before = time.perf_counter()
            self._pause()
            self._paused += time.perf_counter() - before

    def stop(self) -> None:
        if self._ends:
            self.cpu += self._cpu_end - self._cpu_start
            self.time += self._ends[-1] - self._start
            self.steps += len(self._ends)
            self.intervals += [b - a for a, b in zip([self._start, *self._ends], self._ends)]
            self._ends = []

    def result(self, metrics: dict[str, float]) -> RunResult:
        """The run's timings, with its last loader's `metrics` (see `RunResult.with_valid`)."""
        steps, wall = max(self.steps, 1), time.perf_counter() - self.wall_start
        step_median, first = median(self.intervals), self.first_step or 0.0
        result = RunResult(
            self.time / steps, step_median, self.cpu / steps, wall, self.steps, first
        )
        return result.with_valid(metrics)


# ------------------------------------------------------------ hand-written, full workload
def plain_train(
    work: Workload, model_name: str, logdir: str | Path, ddp: bool = False, device: str = "cpu",
    clock: StepClock | None = None, loaders: dict | None = None, dtype: torch.dtype | None = None,
) -> RunResult:  # fmt: skip
    """The hand-written loop (one process, or DDP in a launched process group); `loaders`
    replace the workload's, `dtype` turns on autocast (fp16 with a GradScaler)."""
    from tqdm.auto import tqdm

    clock, logdir, rank = clock or StepClock(), Path(logdir), 0
    if ddp:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        rank = dist.get_rank()
        sampler = lambda data, train: DistributedSampler(data, shuffle=train, seed=work.seed)  # noqa: E731
        loaders = make_loaders(work, sampler)
    own_loaders, model, optimizer = setup(work, model_name, device)
    loaders = loaders or own_loaders
    scaler = torch.amp.GradScaler(device.split(":")[0]) if dtype is torch.float16 else None
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    criterion = nn.CrossEntropyLoss()
    # one context for every batch, as ddprun's engine: torch.autocast objects re-enter
    amp = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()

    def one_loader(epoch: int, key: str, loader: Any) -> dict[str, float]:
        training = key.startswith("train")
        net.train(training)
        # the lean bookkeeping, on the device: two accumulators, no host read per batch
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        samples, steps, last_refresh = 0, len(loader), 0.0
        bar = tqdm(total=steps, desc=f"{epoch}/{work.epochs} * Epoch ({key})", disable=rank > 0)
        with torch.set_grad_enabled(training):
            if training:
                clock.start()
            for index, (x, y) in enumerate(loader, 1):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with amp:
                    logits = net(x)
                    loss = criterion(logits, y)
                if training and scaler is None:
                    loss.backward()
                    optimizer.step()
                elif training:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if training:
                    optimizer.zero_grad(set_to_none=True)
                hits = logits.argmax(dim=1).eq(y).sum()
                loss_sum.add_(loss.detach(), alpha=y.shape[0])
                correct.add_(hits)
                samples += y.shape[0]
                bar.update(1)
                now = time.monotonic()
                if rank == 0 and now - last_refresh >= 0.5:  # the batch's accuracy when shown
                    last_refresh = now
                    accuracy = float(hits) / y.shape[0]
                    bar.set_postfix(loss=f"{float(loss):.4g}", acc=f"{accuracy:.4g}")
                if training:
                    clock.end(index == steps)
        bar.close()
        if training:
            clock.stop()
        sums = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(samples)])
        if ddp:
            dist.all_reduce(sums)
        return {"loss": (sums[0] / sums[2]).item(), "accuracy01": (sums[1] / sums[2]).item()}

    best, metrics = math.inf, {}
    (logdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for epoch in range(1, work.epochs + 1):
        for key, loader in loaders.items():
            if ddp:
                loader.sampler.set_epoch(epoch)
            metrics = one_loader(epoch, key, loader)
            if rank == 0:
                append_csv(logdir / f"{key}.csv", epoch, metrics)
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**state, "epoch": epoch}, logdir / "checkpoints/last.pth")
            if metrics["loss"] < best:
                best = metrics["loss"]
                torch.save({**state, "epoch": epoch}, logdir / "checkpoints/best.pth")
    return clock.result(metrics)


def append_csv(path: Path, step: int, row: dict[str, float]) -> None:
    """Append `row` to a CSV file (with its header when the file is new)."""
    new = not path.exists()
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["step", *sorted(row)])
        if new:
            writer.writeheader()
        writer.writerow({"step": step, **row})


# ------------------------------------------------------------------ ddprun, full workload
def ddprun_train(
    work: Workload, model_name: str, logdir: str | Path, engine: Any = None, ddp: bool = False,
    clock: StepClock | None = None, loaders: dict | None = None,
) -> RunResult:  # fmt: skip
    """The same work through ``dl.Runner.train`` with the usual callbacks and a CSV logger."""
    from ddprun import dl

    own_loaders, model, optimizer = setup(work, model_name)
    clock, loaders = clock or StepClock(), loaders or own_loaders
    if engine is None:
        engine = dl.DistributedDataParallelEngine() if ddp else dl.DeviceEngine("cpu")
    bench_runner, probe = _classes()
    runner = bench_runner()
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        loaders=loaders,
        engine=engine,
        callbacks={
            "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "accuracy": dl.AccuracyCallback(input_key="logits", target_key="targets"),
            "checkpoint": dl.CheckpointCallback(
                logdir=str(logdir), loader_key=list(loaders)[-1], metric_key="loss"
            ),
            "tqdm": dl.TqdmCallback(),
            "_probe": probe(clock),
        },
        loggers={"csv": dl.CSVLogger(logdir=str(logdir))},
        seed=work.seed,
        num_epochs=work.epochs,
    )
    return clock.result(runner.epoch_metrics.get("valid", {}))


@functools.cache
def _classes() -> tuple[type, type]:
    """The benchmark's Runner (a tuple batch into a dict) and StepProbe, a callback ordered
    last that drives a `StepClock` at loader start and batch end, as the hand loop does."""
    from ddprun import dl

    class BenchRunner(dl.Runner):
        def handle_batch(self, batch: Any) -> None:
            x, y = batch
            self.batch = {"features": x, "targets": y, "logits": self.model(x)}

    class StepProbe(dl.Callback):
        def __init__(self, clock: StepClock) -> None:
            super().__init__(order=10_000)
            self.clock = clock

        def on_loader_start(self, runner: Any) -> None:
            if runner.is_train_loader:
                self.clock.start()

        def on_batch_end(self, runner: Any) -> None:
            if runner.is_train_loader:
                self.clock.end(runner.loader_batch_step == runner.loader_batch_len)

        def on_loader_end(self, runner: Any) -> None:
            if runner.is_train_loader:
                self.clock.stop()

    return BenchRunner, StepProbe


# ------------------------------------------------------------------------ lean workload
def lean_plain(work: Workload, model_name: str) -> RunResult:
    """A hand loop with a default ddprun run's per-batch work: forward, loss, backward, step,
    zero_grad; the loss summed weighted by batch size and the correct count, on the device;
    the loader means read once per loader and printed."""
    loaders, model, optimizer = setup(work, model_name)
    criterion, epochs = nn.CrossEntropyLoss(), []
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(1, work.epochs + 1):
        epoch_start = time.perf_counter()
        for key, loader in loaders.items():
            training = key.startswith("train")
            model.train(training)
            loss_sum = torch.zeros((), dtype=torch.float64)
            correct = torch.zeros((), dtype=torch.int64)
            samples = 0
            with torch.set_grad_enabled(training):
                for x, y in loader:
                    logits = model(x)
                    loss = criterion(logits, y)
                    if training:
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    loss_sum.add_(loss.detach(), alpha=y.shape[0])
                    correct.add_(logits.argmax(dim=1).eq(y).sum())
                    samples += y.shape[0]
            metrics = {"loss": loss_sum.item() / samples, "accuracy01": correct.item() / samples}
            print(f"{epoch} {key}: {metrics}")
        epochs.append(time.perf_counter() - epoch_start)
    return _lean_result(work, loaders, start, cpu, epochs).with_valid(metrics)


def lean_ddprun(work: Workload, model_name: str) -> RunResult:
    """``dl.SupervisedRunner().train`` with its defaults (console logger, criterion and
    optimizer callbacks) and an AccuracyCallback; epoch times from an epoch-only callback."""
    from ddprun import dl

    # built before the clock starts, as in lean_plain (Adam's first use imports torch._dynamo)
    loaders, model, optimizer = setup(work, model_name)
    epochs: list[float] = []

    class EpochClock(dl.Callback):
        def on_epoch_start(self, runner: Any) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, runner: Any) -> None:
            epochs.append(time.perf_counter() - self.start)

    runner = dl.SupervisedRunner()
    accuracy = dl.AccuracyCallback(input_key="logits", target_key="targets")
    start, cpu = time.perf_counter(), time.process_time()
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        loaders=loaders,
        callbacks=[accuracy, EpochClock(order=10_000)],
        num_epochs=work.epochs,
    )
    result = _lean_result(work, loaders, start, cpu, epochs)
    return result.with_valid(runner.epoch_metrics["valid"])


def _lean_result(
    work: Workload, loaders: dict, start: float, cpu: float, epochs: list
) -> RunResult:
    loop, cpu = time.perf_counter() - start, time.process_time() - cpu
    per_epoch = sum(len(loader) for loader in loaders.values())
    steps = per_epoch * work.epochs
    step_median = median(epochs) / per_epoch
    return RunResult(loop / steps, step_median, cpu / steps, loop, steps, epoch_s=epochs)


def run_loop(kind: str, work: Workload, model: str, lean: bool) -> RunResult:
    """One quiet run of `kind` ("plain" or "ddprun") on the lean or the full workload."""
    with tempfile.TemporaryDirectory(prefix=f"ddprun-bench-{kind}-") as logdir, quiet():
        if lean:
            result = (lean_plain if kind == "plain" else lean_ddprun)(work, model)
        else:
            result = (plain_train if kind == "plain" else ddprun_train)(work, model, logdir)
    return result


def alternate(runs: dict[str, Callable[[Workload], RunResult]], work: Workload, reps: int) -> dict:
    """Whole runs of each kind in `runs` in this process, `reps` rounds in rotating order (no
    kind always follows another) after one short warm-up run of each; kind -> its results."""
    for run in runs.values():
        run(replace(work, epochs=1, train_samples=min(work.train_samples, 2048)))
    found: dict[str, list[RunResult]] = {kind: [] for kind in runs}
    kinds = list(runs)
    for rep in range(reps):
        for kind in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:
            found[kind].append(runs[kind](work))
        log(
            f"  round {rep + 1}/{reps}: "
            + ", ".join(f"{k} {fmt_time(v[-1].step_median_s)}" for k, v in found.items())
        )
    return found


# ---------------------------------------------------------------------------- lockstep
def lockstep(plain: Callable, ours: Callable, every: int = 7, first: str = "plain") -> dict:
    """Run `plain(pause)` and `ours(pause)` in two threads taking turns every `every` train
    steps, `first` starting; returns ``{"plain": RunResult, "ddprun": RunResult}``.

    Turns of a few milliseconds see the same machine weather (RESULTS.md); each side calls
    `pause` after every train step and leaves its time out. The turns are the same on every
    rank, so ranks issue the same collectives in the same order. The side that starts pays the
    warm-up: callers alternate `first` and pair the runs (`ratios(balanced=True)`).
    """
    turn = {side: threading.Semaphore(int(first == side)) for side in ("plain", "ddprun")}
    finished: set[str] = set()
    results: dict[str, RunResult] = {}
    errors: list[BaseException] = []

    def side(me: str, other: str, train: Callable) -> None:
        steps = 0

        def pause() -> None:
            nonlocal steps
            steps += 1
            if steps % every == 0 and other not in finished:
                turn[other].release()
                turn[me].acquire()

        turn[me].acquire()
        try:
            results[me] = train(pause)
        except BaseException as error:  # re-raised by the caller's thread
            errors.append(error)
        finally:
            finished.add(me)
            turn[other].release()

    threads = [
        threading.Thread(target=side, args=("plain", "ddprun", plain)),
        threading.Thread(target=side, args=("ddprun", "plain", ours)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# ----------------------------------------------------------------------------- helpers
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def ratios(
    ours: Sequence, ref: Sequence, key: str = "step_median_s", balanced: bool = False
) -> dict:
    """Both sides' medians of `key` (an attribute or a dict key of each run) and the median,
    min and max of the paired ratios ours / ref; `balanced`: of the geometric means of
    consecutive pairs of ratios (lockstep runs, in which plain and ddprun start in turn)."""

    def get(run: Any) -> float:
        return run[key] if isinstance(run, dict) else getattr(run, key)

    pairs = [get(o) / get(r) for o, r in zip(ours, ref)]
    if balanced:  # the side that starts a lockstep run can come out a few percent slower
        pairs = [math.sqrt(a * b) for a, b in zip(pairs[0::2], pairs[1::2])]
    medians = {"ref": median([get(r) for r in ref]), "ours": median([get(o) for o in ours])}
    return {**medians, "ratio": median(pairs), "ratio_min": min(pairs), "ratio_max": max(pairs)}


def emit(result: dict[str, Any]) -> None:
    """Print one machine-readable result line (run_all.py collects these)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_results(text: str) -> list[dict[str, Any]]:
    n = len(RESULT_PREFIX)
    return [json.loads(line[n:]) for line in text.splitlines() if line.startswith(RESULT_PREFIX)]


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
