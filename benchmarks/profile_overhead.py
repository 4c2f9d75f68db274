"""Where ddprun's per-step overhead goes (tiny model, one thread), and what the proposed fixes
save. Nothing in ddprun is edited: each proposed fix is applied here as a temporary patch
(restored afterwards), so the saving is measured before anyone changes the package.

    python benchmarks/profile_overhead.py [--micro] [--ablate] [--cprofile] [--quick]

- ``--micro``: per-call cost of the per-batch pieces (timeit, best of 5): ddprun's metric
  updates next to what a hand-written loop does for the same numbers;
- ``--ablate``: the bench_single workload with ddprun as is and with the fixes applied one by
  one, alternating with the plain loop: median step time and the overhead over plain;
- ``--cprofile``: ddprun's own functions by cumulative time per train step (cProfile inflates
  Python-heavy code, so read it as a ranking, and the ablation as the measurement).

With no flag, all three run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import math
import pstats
import timeit
from collections.abc import Callable, Iterator
from typing import Any

import bench_common as bc
import torch

# ------------------------------------------------------------------ the fixes
# Each context manager installs one proposed change (the same code as the proposed diff) and
# restores the original on exit.


_AVERAGING: dict[str, Any] = {"exact-keys": False, "mean-only": False, "installed": 0}


def _patched_average_batch_metrics(self: Any) -> None:
    """IRunner._average_batch_metrics with fix 1 and/or fix 2 switched on."""
    exact = self.__dict__.get("_exact_keys", ()) if _AVERAGING["exact-keys"] else ()
    if upstream_exact_keys():
        exact = self._exact_keys  # ddprun skips them itself: keep doing so
    kind = MeanMetric if _AVERAGING["mean-only"] else _AVERAGING["additive"]
    for key, value in self.batch_metrics.items():
        if key in exact:
            continue
        average = self._batch_averages.get(key)
        if average is None:
            average = kind(metric_key=key).to(self.device)
            self._batch_averages[key] = average
        average.update(value, self.batch_size)


@contextlib.contextmanager
def _averaging(flag: str) -> Iterator[None]:
    from ddprun.core import runner as R
    from ddprun.metrics import AdditiveMetric

    if _AVERAGING["installed"] == 0:
        _AVERAGING["additive"] = AdditiveMetric
        _AVERAGING["original"] = R.IRunner._average_batch_metrics
        R.IRunner._average_batch_metrics = _patched_average_batch_metrics
    _AVERAGING["installed"] += 1
    _AVERAGING[flag] = True
    try:
        yield
    finally:
        _AVERAGING[flag] = False
        _AVERAGING["installed"] -= 1
        if _AVERAGING["installed"] == 0:
            R.IRunner._average_batch_metrics = _AVERAGING.pop("original")


@functools.cache
def upstream_exact_keys() -> bool:
    """Whether ddprun already skips the exact keys (commit 7cbe8d3: `track_metric(metric,
    batch_keys=...)`); then fix 1 is a no-op here."""
    import inspect

    from ddprun.core import runner as R

    return "batch_keys" in inspect.signature(R.IRunner.track_metric).parameters


@contextlib.contextmanager
def fix_exact_keys() -> Iterator[None]:
    """Fix 1: do not average batch values of keys that a tracked metric computes exactly
    (``accuracy01`` ...): the runner's AdditiveMetric for them is overwritten at loader end
    anyway. runner.py: `track_metric` records the metric's keys, `_average_batch_metrics`
    skips them, `_start_loader` resets them."""
    from ddprun.core import runner as R

    if upstream_exact_keys():
        yield
        return
    saved_track, saved_start = R.IRunner.track_metric, R.IRunner._start_loader

    def track_metric(self: Any, metric: Any) -> Any:
        self._tracked_metrics.append(metric)
        self._exact_keys.update(getattr(metric, "keys", ()))
        return metric

    def _start_loader(self: Any, loader_key: str, loader: Any) -> None:
        saved_start(self, loader_key, loader)
        self._exact_keys = set()

    R.IRunner.track_metric = track_metric
    R.IRunner._start_loader = _start_loader
    try:
        with _averaging("exact-keys"):
            yield
    finally:
        R.IRunner.track_metric, R.IRunner._start_loader = saved_track, saved_start


def _mean_metric_class() -> type:
    from ddprun.metrics import Metric

    class _MeanMetric(Metric):
        """Sample-weighted mean only: all the runner reads from its batch averages
        (``average.compute()[0]``); no square sum and no separate float64 cast op."""

        def __init__(self, metric_key: str | None = None) -> None:
            super().__init__()
            self.metric_key = metric_key
            zero = torch.zeros((), dtype=torch.float64)
            self.add_state("weighted_sum", zero, "sum")
            self.add_state("num_samples", zero, "sum")

        def update(self, value: Any, num_samples: int) -> None:
            self.num_samples.add_(num_samples)
            if isinstance(value, torch.Tensor):
                value = value.detach()
                if value.dim():
                    value = value.reshape(())
                if value.device != self.device:
                    value = value.to(self.device)
                # the float64 state promotes `value` inside the op: same sum, no cast op
                self.weighted_sum.add_(value, alpha=num_samples)
            else:
                self.weighted_sum.add_(value * num_samples)

        def compute(self) -> tuple[float, float]:
            total, value_sum = torch.stack([self.num_samples, self.weighted_sum]).tolist()
            return (value_sum / total if total > 0 else math.nan), math.nan

        def compute_key_value(self) -> dict[str, float]:
            return {self.metric_key: self.compute()[0]}

    return _MeanMetric


_MEAN_CLASS: list[type] = []


def MeanMetric(metric_key: str | None = None) -> Any:  # noqa: N802 (a class factory)
    if not _MEAN_CLASS:
        _MEAN_CLASS.append(_mean_metric_class())
    return _MEAN_CLASS[0](metric_key=metric_key)


@contextlib.contextmanager
def fix_mean_only() -> Iterator[None]:
    """Fix 2: the runner's batch averages keep only what it reads (the mean): a 2-state
    mean metric instead of AdditiveMetric (sum, square sum, count, plus a cast op)."""
    with _averaging("mean-only"):
        yield


def _topk_correct_fast(original: Callable) -> Callable:
    def topk_correct(outputs: Any, targets: Any, topk: Any = (1,)) -> Any:
        if outputs.dim() == 2 and outputs.shape[1] > 1 and tuple(topk) == (1,):
            labels = targets.argmax(dim=1) if targets.dim() == 2 and targets.shape[1] > 1 else None
            if labels is None:
                labels = targets.reshape(-1).long()
            return outputs.argmax(dim=1).eq(labels).sum().reshape(1)
        return original(outputs, targets, topk)

    return topk_correct


@contextlib.contextmanager
def fix_top1() -> Iterator[None]:
    """Fix 3: top-1 accuracy through argmax instead of topk + cumsum + stack
    (metrics/functional.py `topk_correct`)."""
    from ddprun.metrics import classification, functional

    saved = functional.topk_correct
    fast = _topk_correct_fast(saved)
    functional.topk_correct = fast
    # classification.py calls it as F.topk_correct, F being the functional module: patched above.
    assert classification.F is functional
    try:
        yield
    finally:
        functional.topk_correct = saved


@contextlib.contextmanager
def fix_dispatch() -> Iterator[None]:
    """Fix 4: fire events through bound methods resolved once per stage (core/runner.py)."""
    from ddprun.core import runner as R

    saved = R.IRunner._fire_callbacks

    def _fire_callbacks(self: Any, event: Any) -> None:
        cache = self.__dict__.get("_bound")
        if cache is None or cache[0] is not self._dispatch:
            bound = {e: [getattr(cb, e.value) for cb in cbs] for e, cbs in self._dispatch.items()}
            cache = self.__dict__["_bound"] = (self._dispatch, bound)
        for method in cache[1][event]:
            method(self)

    R.IRunner._fire_callbacks = _fire_callbacks
    try:
        yield
    finally:
        R.IRunner._fire_callbacks = saved


FIXES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "exact-keys": fix_exact_keys,
    "mean-only": fix_mean_only,
    "top1": fix_top1,
    "dispatch": fix_dispatch,
}


@contextlib.contextmanager
def applied(names: list[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(FIXES[name]())
        yield


def check_fixes_equivalent() -> None:
    """The patched code gives the same numbers as the original (checked before timing)."""
    from ddprun.metrics import AdditiveMetric
    from ddprun.metrics import functional as F

    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        logits = torch.randn(64, 10, generator=gen)
        targets = torch.randint(0, 10, (64,), generator=gen)
        with fix_top1():
            fast = F.topk_correct(logits, targets, (1,))
        assert torch.equal(fast, F.topk_correct(logits, targets, (1,)))
        a, b = AdditiveMetric(metric_key="x"), MeanMetric(metric_key="x")
        for value in torch.rand(20, generator=gen, dtype=torch.float32) * 10:
            a.update(value, 64)
            b.update(value, 64)
        assert a.compute()[0] == b.compute()[0], (a.compute(), b.compute())


# ---------------------------------------------------------------------- micro
def micro() -> list[tuple[str, float]]:
    from ddprun import dl
    from ddprun.metrics import AccuracyMetric, AdditiveMetric

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 10)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    detached = logits.detach()
    accuracy = AccuracyMetric(topk=(1,))
    average = AdditiveMetric(metric_key="loss")
    mean = MeanMetric(metric_key="loss")
    sums = torch.zeros(3, dtype=torch.float64)
    engine = dl.DeviceEngine("cpu")
    batch = [x, y]

    def plain_metrics() -> None:
        correct = detached.argmax(dim=1).eq(y).sum()
        _ = correct / 64
        sums[0] += loss.detach() * 64
        sums[1] += correct
        sums[2] += 64

    def autocast() -> None:
        with engine.autocast():
            pass

    cases: list[tuple[str, Callable[[], Any] | None]] = [
        ("plain loop: top-1 correct, batch accuracy, loss/correct/count sums", plain_metrics),
        ("ddprun AccuracyMetric.update (top-1), per batch", lambda: accuracy.update(detached, y)),
        ("  fix 3: with the argmax top-1 path", None),
        ("ddprun AdditiveMetric.update(loss), per batch and key", lambda: average.update(loss, 64)),
        ("  fix 2: mean-only update(loss)", lambda: mean.update(loss, 64)),
        ("ddprun engine.move(batch)", lambda: engine.move(batch)),
        ("ddprun engine.autocast() enter+exit (fp32)", autocast),
    ]
    rows = []
    for name, fn in cases:
        with fix_top1() if fn is None else contextlib.nullcontext():
            fn = fn or (lambda: accuracy.update(detached, y))
            for _ in range(300):
                fn()
            best = min(timeit.repeat(fn, number=3000, repeat=5)) / 3000
        rows.append((name, best))
        bc.log(f"  {name}: {best * 1e6:.2f} us")
    return rows


def loop_floor(n: int = 5000) -> tuple[float, float]:
    """Per-batch cost of the loop itself: ddprun's Runner with no callbacks but the timing
    probe, on ready-made batches, vs a Python loop doing the same (a dict per batch and a
    time stamp). Returns (plain, ddprun) seconds per batch, best of 3."""
    import time

    from ddprun import dl

    batches = [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))] * n

    class Floor(dl.Runner):
        def handle_batch(self, batch: Any) -> None:
            self.batch = {"features": batch[0]}

    ours, plain = [], []
    for _ in range(3):
        probe = bc._probe_callback(dl)()
        with bc.quiet():
            Floor().train(
                model=torch.nn.Linear(2, 2),
                loaders={"train": batches},
                engine=dl.DeviceEngine("cpu"),
                callbacks={"_probe": probe},
                loggers={},
            )
        ours.append(probe.train_time / probe.train_steps)
        ends: list[float] = []
        start = time.perf_counter()
        for x, _ in batches:
            _ = {"features": x}
            ends.append(time.perf_counter())
        plain.append((ends[-1] - start) / n)
    return min(plain), min(ours)


# -------------------------------------------------------------------- ablation
VARIANTS: list[tuple[str, list[str]]] = [
    ("ddprun as is", []),
    ("+ fix 1 exact-keys (in ddprun since 7cbe8d3)", ["exact-keys"]),
    ("+ fix 1, 2 mean-only", ["exact-keys", "mean-only"]),
    ("+ fix 1, 2, 3 top1", ["exact-keys", "mean-only", "top1"]),
    ("+ fix 1-4 dispatch", ["exact-keys", "mean-only", "top1", "dispatch"]),
]


def ablate(work: bc.Workload, model: str, reps: int) -> list[dict[str, Any]]:
    if upstream_exact_keys():
        bc.log(
            "  fix 1 is already in ddprun (track_metric(batch_keys=...)): its row equals 'as is'"
        )

    def run(fixes: list[str] | None) -> float:
        with bc.temp_logdir("ablate") as logdir, bc.quiet():
            if fixes is None:
                return bc.plain_train(work, model, logdir).step_median_s
            with applied(fixes):
                return bc.ddprun_train(work, model, logdir).step_median_s

    warm = bc.replace(work, epochs=1, train_samples=2048)
    with bc.temp_logdir("warm") as logdir, bc.quiet():
        bc.plain_train(warm, model, logdir)
        bc.ddprun_train(warm, model, logdir)
    plain: list[float] = []
    times: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    for rep in range(reps):
        plain.append(run(None))
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        for name, fixes in order:
            times[name].append(run(fixes))
        plain.append(run(None))
    base = bc.median(plain)
    rows = [{"variant": "plain loop", "step_s": base, "overhead_s": 0.0, "ratio": 1.0}]
    for name, _ in VARIANTS:
        step = bc.median(times[name])
        rows.append(
            {"variant": name, "step_s": step, "overhead_s": step - base, "ratio": step / base}
        )
    return rows


# -------------------------------------------------------------------- cProfile
def profile(work: bc.Workload, model: str, top: int = 25) -> list[tuple[str, float, float]]:
    with bc.temp_logdir("warm") as logdir, bc.quiet():
        bc.ddprun_train(bc.replace(work, epochs=1, train_samples=2048), model, logdir)
    profiler = cProfile.Profile()
    with bc.temp_logdir("prof") as logdir, bc.quiet():
        profiler.enable()
        result = bc.ddprun_train(work, model, logdir)
        profiler.disable()
    steps = result.steps + work.epochs * -(-work.valid_samples // work.batch_size)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (_, calls, tottime, cumtime, _) in stats.items():
        if "/ddprun/" not in filename.replace("\\", "/"):
            continue
        where = filename.replace("\\", "/").split("/ddprun/")[-1]
        rows.append((f"{where}:{line} {func} ({calls} calls)", cumtime / steps, tottime / steps))
    rows.sort(key=lambda row: -row[1])
    return rows[:top]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--ablate", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="tiny", choices=bc.MODELS)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    every = not (args.micro or args.ablate or args.cprofile)
    torch.set_num_threads(1)
    work = bc.Workload().quick() if args.quick else bc.Workload()
    check_fixes_equivalent()
    if args.micro or every:
        print("\n### Per-call cost of the per-batch pieces (best of 5, one thread)\n")
        print("| piece | time per call |\n|---|---|")
        for name, seconds in micro():
            print(f"| {name} | {seconds * 1e6:.2f} us |")
    if args.micro or every:
        plain, ours = loop_floor()
        print(
            f"| loop machinery per batch, no callbacks (plain / ddprun) | "
            f"{plain * 1e6:.2f} us / {ours * 1e6:.2f} us |"
        )
    if args.ablate or every:
        reps = args.reps or (2 if args.quick else 4)
        print(f"\n### Ablation, {args.model} model, median step over {reps} rounds\n")
        print("| variant | median step | overhead over plain | ratio |\n|---|---|---|---|")
        for row in ablate(work, args.model, reps):
            print(
                f"| {row['variant']} | {bc.fmt_time(row['step_s'])} | "
                f"{row['overhead_s'] * 1e6:+.1f} us | x{row['ratio']:.3f} |"
            )
    if args.cprofile or every:
        print(f"\n### cProfile, {args.model} model: ddprun functions per step (train + valid)\n")
        print("| function | cumulative / step | own / step |\n|---|---|---|")
        for name, cum, own in profile(work, args.model):
            print(f"| {name} | {cum * 1e6:.1f} us | {own * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
