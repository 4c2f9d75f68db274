"""Shared pieces of the benchmarks: the workload, the data, the models, and the two training
loops being compared -- a hand-written PyTorch loop and the same work through ddprun's Runner.

Both loops do the same work per run:

- train: forward, cross-entropy, backward, Adam step, zero_grad(set_to_none=True), top-1
  accuracy of every batch (kept as a tensor, no host read) and running loss/accuracy sums;
- a progress bar per loader (tqdm; ddprun: TqdmCallback) with the batch metrics refreshed at
  most every 0.5 s;
- validation without gradients, with loss and accuracy over the loader;
- per epoch: one CSV row per loader and a checkpoint (last, and best by validation loss).

Per-step time is measured at the same points in both, by one `StepClock`: from just before the
first batch is fetched from the train loader (ddprun: the last ``on_loader_start`` callback) to
the end of the last train batch (ddprun: the last ``on_batch_end`` callback), divided by the
number of train steps; the median of the individual step intervals is kept as well, and the
process CPU time (all threads) per train step over the same span, which a busy neighbour on a
shared machine disturbs much less than wall time. Whole-run wall time is the whole training
call, from building the loaders to the last checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

RESULT_PREFIX = "BENCH_RESULT "


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

    @property
    def train_steps_per_epoch(self) -> int:
        return -(-self.train_samples // self.batch_size)

    def quick(self) -> Workload:
        return replace(self, epochs=1, train_samples=4096, valid_samples=1024)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MODELS = ("tiny", "mlp")


def make_model(name: str, features: int = 256, classes: int = 10) -> nn.Module:
    """ "tiny": Linear(256, 10); "mlp": 256-512-512-10 with ReLU."""
    if name == "tiny":
        return nn.Linear(features, classes)
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(features, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, classes),
        )
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def make_data(work: Workload) -> tuple[TensorDataset, TensorDataset]:
    """A learnable synthetic problem: labels are the arg-max of a fixed random projection."""
    gen = torch.Generator().manual_seed(work.seed)
    total = work.train_samples + work.valid_samples
    x = torch.randn(total, work.features, generator=gen)
    w = torch.randn(work.features, work.classes, generator=gen)
    y = (x @ w).argmax(dim=1)
    n = work.train_samples
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def make_loaders(
    work: Workload, data: tuple[TensorDataset, TensorDataset], sampler_factory: Any = None
) -> dict[str, DataLoader]:
    """Train (shuffled, seeded generator) and valid loaders; `sampler_factory(dataset, train)`
    gives samplers for the hand-written DDP loop."""
    train, valid = data
    if sampler_factory is None:
        gen = torch.Generator().manual_seed(work.seed)
        return {
            "train": DataLoader(train, batch_size=work.batch_size, shuffle=True, generator=gen),
            "valid": DataLoader(valid, batch_size=work.batch_size),
        }
    return {
        "train": DataLoader(
            train, batch_size=work.batch_size, sampler=sampler_factory(train, True)
        ),
        "valid": DataLoader(
            valid, batch_size=work.batch_size, sampler=sampler_factory(valid, False)
        ),
    }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Send stdout and stderr (progress bars, console lines) to /dev/null for a timed run."""
    with open(os.devnull, "w") as sink:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield


@dataclass
class RunResult:
    """One training run: train time per step, whole-run wall time, the last epoch's metrics."""

    step_s: float  # train-loader time / train steps
    step_median_s: float  # median of the individual step intervals (robust to preemption)
    cpu_step_s: float  # process CPU time (all threads) per train step: robust to a busy machine
    wall_s: float
    steps: int
    first_step_time: float  # time.time() just before the first train batch is fetched
    valid_loss: float
    valid_accuracy: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------- step timing
class StepClock:
    """Train-step timing at the same points for every loop: `start()` just before the first
    batch of a train loader is fetched, `end(last)` at the end of every train batch, `stop()`
    after the loader.

    `pause`, when given, is called at every `end` (lockstep runs: it may hand the CPU to the
    other side); the time spent in it is left out of the step times.
    """

    def __init__(self, pause: Callable[[], None] | None = None) -> None:
        self.wall_start = time.perf_counter()
        self.intervals: list[float] = []
        self.time = self.cpu = 0.0
        self.steps = 0
        # time.time() at the first train loader's start, not per batch: no loop pays an extra
        # per-batch hook for it (only the DDP start-up benchmark reads it)
        self.first_step: float | None = None
        self._pause = pause
        self._paused = self._start = self._cpu_start = self._cpu_end = 0.0
        self._ends: list[float] = []

    def start(self) -> None:
        if self.first_step is None:
            self.first_step = time.time()
        self._ends = []
        self._paused = 0.0
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def end(self, last: bool = False) -> None:
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
            self.intervals += _intervals(self._start, self._ends)
            self._ends = []

    def result(self, valid_loss: float, valid_accuracy: float) -> RunResult:
        return RunResult(
            step_s=self.time / max(self.steps, 1),
            step_median_s=median(self.intervals),
            cpu_step_s=self.cpu / max(self.steps, 1),
            wall_s=time.perf_counter() - self.wall_start,
            steps=self.steps,
            first_step_time=self.first_step or 0.0,
            valid_loss=valid_loss,
            valid_accuracy=valid_accuracy,
        )


# ------------------------------------------------------------------ plain PyTorch
def loader_pass(
    work: Workload,
    epoch: int,
    key: str,
    loader: Iterable,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    backward: Callable[[torch.Tensor], None],
    clock: StepClock,
    show: bool,
    device: str | None = None,
) -> torch.Tensor:
    """One loader of the hand-written loop; returns the float64 sums loss*n, correct, n (on
    `device`, or the CPU). Batches are moved to `device` when given (frameworks that own the
    loader move them themselves)."""
    from tqdm.auto import tqdm

    training = key.startswith("train")
    model.train(training)
    criterion = nn.CrossEntropyLoss()
    # float64 sums on the device: loss*samples, correct, samples (no host sync per batch)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    steps = len(loader)  # type: ignore[arg-type]
    bar = tqdm(
        total=steps,
        desc=f"{epoch}/{work.epochs} * Epoch ({key})",
        leave=True,
        dynamic_ncols=True,
        disable=not show,
    )
    last_refresh = 0.0
    with torch.set_grad_enabled(training):
        if training:
            clock.start()
        for step, (x, y) in enumerate(loader, 1):
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = criterion(logits, y)
            if training:
                backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                correct = logits.argmax(dim=1).eq(y).sum()
                accuracy = correct / y.shape[0]  # accuracy of every batch, no host read
                sums[0] += loss.detach() * y.shape[0]
                sums[1] += correct
                sums[2] += y.shape[0]
            bar.update(1)
            now = time.monotonic()
            if now - last_refresh >= 0.5 and show:
                last_refresh = now
                postfix = {"loss": f"{float(loss):.4g}", "acc": f"{float(accuracy):.4g}"}
                bar.set_postfix(postfix, refresh=True)
            if training:
                clock.end(step == steps)
    bar.close()
    if training:
        clock.stop()
    return sums


def means(sums: torch.Tensor) -> dict[str, float]:
    """`loss` and `accuracy01` from `loader_pass`'s sums (one host read per loader)."""
    return {"loss": (sums[0] / sums[2]).item(), "accuracy01": (sums[1] / sums[2]).item()}


def plain_train(
    work: Workload,
    model_name: str,
    logdir: str | Path,
    ddp: bool = False,
    device: str = "cpu",
    pause: Callable[[], None] | None = None,
) -> RunResult:
    """The hand-written loop (single process, or DDP in a launched process group); `pause` as
    in `StepClock`."""
    clock = StepClock(pause)
    logdir = Path(logdir)
    (logdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (logdir / "logs").mkdir(parents=True, exist_ok=True)
    dist = None
    rank = 0
    if ddp:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        rank = dist.get_rank()

        def sampler(dataset: Any, train: bool) -> DistributedSampler:
            return DistributedSampler(dataset, shuffle=train, seed=work.seed)

        loaders = make_loaders(work, make_data(work), sampler)
    else:
        loaders = make_loaders(work, make_data(work))
    torch.manual_seed(work.seed)
    model = make_model(model_name, work.features, work.classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if ddp else model
    best = float("inf")
    metrics: dict[str, float] = {}
    for epoch in range(1, work.epochs + 1):
        for key, loader in loaders.items():
            if ddp:
                loader.sampler.set_epoch(epoch)
            sums = loader_pass(
                work, epoch, key, loader, net, optimizer, _backward, clock, rank == 0, device
            )
            if ddp:
                dist.all_reduce(sums)
            metrics = means(sums)
            if rank == 0:
                _append_csv(logdir / "logs" / f"{key}.csv", epoch, metrics)
        if rank == 0:
            state = {
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "epoch": epoch,
                "metrics": metrics,
            }
            torch.save(state, logdir / "checkpoints" / "last.pth")
            if metrics["loss"] < best:
                best = metrics["loss"]
                torch.save(state, logdir / "checkpoints" / "best.pth")
    return clock.result(metrics["loss"], metrics["accuracy01"])


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def _append_csv(path: Path, step: int, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["step", *sorted(row)])
        if new:
            writer.writeheader()
        writer.writerow({"step": step, **row})


# ------------------------------------------------------------------------ ddprun
def ddprun_train(
    work: Workload,
    model_name: str,
    logdir: str | Path,
    engine: Any = None,
    ddp: bool = False,
    pause: Callable[[], None] | None = None,
) -> RunResult:
    """The same work through ``dl.Runner.train`` with the usual callbacks and a CSV logger;
    `pause` as in `plain_train`."""
    from ddprun import dl

    clock = StepClock(pause)
    probe = _probe_callback(dl)(clock)
    loaders = make_loaders(work, make_data(work))
    torch.manual_seed(work.seed)
    model = make_model(model_name, work.features, work.classes)
    if ddp and engine is None:
        engine = dl.DistributedDataParallelEngine()
    runner = _runner_class(dl)()
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=work.lr),
        loaders=loaders,
        engine=engine if engine is not None else dl.DeviceEngine("cpu"),
        callbacks={
            "criterion": dl.CriterionCallback(
                input_key="logits", target_key="targets", metric_key="loss"
            ),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "accuracy": dl.AccuracyCallback(input_key="logits", target_key="targets"),
            "checkpoint": dl.CheckpointCallback(
                logdir=str(Path(logdir) / "checkpoints"),
                loader_key="valid",
                metric_key="loss",
                minimize=True,
            ),
            "tqdm": dl.TqdmCallback(),
            "_probe": probe,
        },
        loggers={"csv": dl.CSVLogger(logdir=str(logdir))},
        seed=work.seed,
        num_epochs=work.epochs,
    )
    valid = runner.epoch_metrics.get("valid", {})
    return clock.result(
        float(valid.get("loss", float("nan"))), float(valid.get("accuracy01", float("nan")))
    )


_CLASSES: dict[str, Any] = {}


def _runner_class(dl: Any) -> type:
    if "runner" not in _CLASSES:

        class BenchRunner(dl.Runner):
            def handle_batch(self, batch: Any) -> None:
                x, y = batch
                self.batch = {"features": x, "targets": y, "logits": self.model(x)}

        _CLASSES["runner"] = BenchRunner
    return _CLASSES["runner"]


def _probe_callback(dl: Any) -> type:
    """A callback that runs last at loader start and last at batch end: a `StepClock` driven
    at the points the hand-written loop drives it."""
    if "probe" not in _CLASSES:

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

        _CLASSES["probe"] = StepProbe
    return _CLASSES["probe"]


# ---------------------------------------------------------------------- lockstep
def lockstep(
    plain: Callable[[Callable[[], None]], RunResult],
    ours: Callable[[Callable[[], None]], RunResult],
    every: int = 7,
    first: str = "plain",
) -> dict[str, RunResult]:
    """Run `plain(pause)` and `ours(pause)` in two threads that take turns every `every` train
    steps, `first` ("plain" or "ddprun") starting; returns ``{"plain": ..., "ddprun": ...}``.

    Two runs one after the other see different machine weather (on a shared 2-core box the step
    time drifts by +-30% within a second); taking turns every few milliseconds puts both sides
    under the same conditions, so their ratio is the framework's cost alone. Each side calls
    `pause` after every train step and leaves the time spent in it out of its step times. Only
    one side's Python runs at a time (background threads such as gloo's keep running); the turns
    are the same on every rank of a process group, so both ranks issue the same collectives in
    the same order.

    What stays uneven, and which way: the first step after a turn finds the other side's data in
    the caches (both sides); the side that starts pays the process's one-time warm-up (callers
    alternate `first`); ddprun's stop agreement sees the other side's turns as longer steps and
    so checks more often than in a run alone (against ddprun). The turn length, 7, is prime, so
    the agreement's async all-reduce (every 1..64 batches) does not always end a turn and run in
    the other side's time.
    """
    if first not in ("plain", "ddprun"):
        raise ValueError(f"first must be 'plain' or 'ddprun', got {first!r}")
    turn = {
        "plain": threading.Semaphore(int(first == "plain")),
        "ddprun": threading.Semaphore(int(first == "ddprun")),
    }
    finished: set[str] = set()
    results: dict[str, RunResult] = {}
    errors: list[BaseException] = []

    def pause_for(me: str, other: str) -> Callable[[], None]:
        steps = 0

        def pause() -> None:
            nonlocal steps
            steps += 1
            if steps % every == 0 and other not in finished:
                turn[other].release()
                turn[me].acquire()

        return pause

    def side(me: str, other: str, train: Callable[[Callable[[], None]], RunResult]) -> None:
        turn[me].acquire()
        try:
            results[me] = train(pause_for(me, other))
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


def order_balanced(ratios: Sequence[float]) -> list[float]:
    """Per pair of lockstep runs (plain started the first, ddprun the second), the geometric
    mean of their two ratios: the side that starts is measured a few percent slower in some
    runs, and each pair cancels that."""
    return [math.sqrt(a * b) for a, b in zip(ratios[0::2], ratios[1::2])]


# ------------------------------------------------------------------------ helpers
def _intervals(start: float, ends: Sequence[float]) -> list[float]:
    """Each step's duration: from the previous step's end (the loader start for the first)."""
    return [b - a for a, b in zip([start, *ends[:-1]], ends)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def temp_logdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"ddprun-bench-{prefix}-")


def emit(result: dict[str, Any]) -> None:
    """Print one machine-readable result line (run_all.py collects these)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_results(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len(RESULT_PREFIX) :])
        for line in text.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
