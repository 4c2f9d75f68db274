"""Metric sync cost at loader end, over two real gloo ranks (torch.multiprocessing spawn).

For 1, 5 and 20 metrics (cycling AccuracyMetric(top1, top3), AdditiveMetric,
MulticlassPrecisionRecallF1SupportMetric(10) and ConfusionMatrixMetric(10)):

- `synchronized(metrics, CountingCollectives(engine))` directly, with the collectives of a set-up
  ``DistributedDataParallelEngine``: collectives, bytes sent into them, and the time of one sync
  (median), next to one all-reduce per state (the naive way: its count and its time);
- through the runner: a 2-rank ``Runner.train`` whose engine counts the metric-sync collectives
  of each loader (metric callbacks + the loss average), for the same numbers of metric
  callbacks; and every torch.distributed collective, per batch and at the loader end (the
  metric sync plus anything else the loop issues there, such as the stop agreement).

    python benchmarks/bench_sync.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as bc
import torch

COUNTS = (1, 5, 20)
CLASSES = 10


class ByteCounter:
    """A `CountingCollectives` that also adds up the bytes handed to each collective."""

    def __init__(self, inner: Any) -> None:
        from ddprun.metrics.sync import CountingCollectives

        self.counting = CountingCollectives(inner)
        self.rank, self.world_size = inner.rank, inner.world_size
        self.bytes = 0

    @property
    def calls(self) -> int:
        report = self.counting.report
        return report.all_reduce_calls + report.all_gather_calls

    @property
    def ops(self) -> list[str]:
        return list(self.counting.report.ops)

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        return self.counting.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.bytes += tensor.numel() * tensor.element_size()
        return self.counting.all_gather(tensor)


class DistCounter:
    """Counts every Python-level torch.distributed collective (all_reduce, all_gather, barrier,
    broadcast, ...) on any group while installed: the metric sync and anything else, e.g. the
    stop agreement. DDP's gradient all-reduces run in C++ and are not counted."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "reduce",
        "reduce_scatter",
        "gather",
        "scatter",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.ops: list[str] = []
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        import torch.distributed as dist

        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))

    def uninstall(self) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.ops.append(name)
            return original(*args, **kwargs)

        return counted


def make_metrics(n: int) -> list[Any]:
    from ddprun import metrics as M

    kinds = itertools.cycle(
        [
            lambda i: M.AccuracyMetric(topk=(1, 3)),
            lambda i: M.AdditiveMetric(metric_key=f"value{i}"),
            lambda i: M.MulticlassPrecisionRecallF1SupportMetric(num_classes=CLASSES),
            lambda i: M.ConfusionMatrixMetric(num_classes=CLASSES),
        ]
    )
    return [next(kinds)(i) for i in range(n)]


def _update(metric: Any, logits: torch.Tensor, targets: torch.Tensor) -> None:
    from ddprun.metrics import AdditiveMetric

    if isinstance(metric, AdditiveMetric):
        metric.update(logits.mean(), targets.shape[0])
    else:
        metric.update(logits, targets)


def _engine_class() -> type:
    from ddprun import dl

    class CountingEngine(dl.DistributedDataParallelEngine):
        """Counts what goes through `collectives`; keeps the group up between runs."""

        counter: ByteCounter | None = None

        @property
        def collectives(self) -> Any:
            if self.world_size <= 1:
                return None
            if self.counter is None:
                self.counter = ByteCounter(self)
            return self.counter

        def teardown(self) -> None:  # the worker destroys the group once, at its end
            pass

    return CountingEngine


def _direct(engine: Any, n: int, reps: int) -> dict[str, Any]:
    from ddprun.metrics import synchronized

    gen = torch.Generator().manual_seed(engine.rank)
    metrics = make_metrics(n)
    for _ in range(4):
        logits = torch.randn(64, CLASSES, generator=gen)
        targets = torch.randint(0, CLASSES, (64,), generator=gen)
        for metric in metrics:
            _update(metric, logits, targets)
    counter = ByteCounter(engine)
    with synchronized(metrics, counter):
        for metric in metrics:
            metric.compute_key_value()
    calls, nbytes, ops = counter.calls, counter.bytes, counter.ops
    times = []
    for _ in range(reps):
        engine.barrier()
        start = time.perf_counter()
        with synchronized(metrics, engine.collectives):
            pass
        times.append(time.perf_counter() - start)
    naive = []  # one all-reduce per state, what a sync without packing would issue
    states = [getattr(m, name) for m in metrics for name in m.reductions]
    for _ in range(reps):
        engine.barrier()
        start = time.perf_counter()
        for state in states:
            engine.all_reduce(state.double(), "sum")
        naive.append(time.perf_counter() - start)
    return {
        "metrics": n,
        "states": len(states),
        "naive_sync_s": statistics.median(naive),
        "collectives": calls,
        "ops": ops,
        "bytes": nbytes,
        "sync_s": statistics.median(times),
    }


def _through_runner(engine: Any, n: int, logdir: str, dist_counter: DistCounter) -> dict[str, Any]:
    from torch import nn

    from ddprun import dl

    runner_class = bc._runner_class(dl)

    class LoaderCount(dl.Callback):
        """Per loader: the metric-sync collectives (through engine.collectives) and every
        torch.distributed collective, split into per-batch ones and those at the loader end
        (after the last batch's callbacks, up to the synced ``on_loader_end``)."""

        def __init__(self) -> None:
            super().__init__(order=10_000)
            self.per_loader: list[dict[str, Any]] = []

        def on_loader_start(self, runner: Any) -> None:
            counter = runner.engine.collectives
            self._calls, self._bytes = counter.calls, counter.bytes
            self._dist_start = self._dist_last = dist_counter.calls
            self._ops_last = len(dist_counter.ops)

        def on_batch_end(self, runner: Any) -> None:
            self._dist_last = dist_counter.calls
            self._ops_last = len(dist_counter.ops)

        def on_loader_end(self, runner: Any) -> None:
            counter = runner.engine.collectives
            self.per_loader.append(
                {
                    "epoch": runner.global_epoch_step,
                    "loader": runner.loader_key,
                    "batches": runner.loader_batch_step,
                    "collectives": counter.calls - self._calls,
                    "bytes": counter.bytes - self._bytes,
                    "dist_per_batch": (self._dist_last - self._dist_start)
                    / max(runner.loader_batch_step, 1),
                    "dist_at_end": dist_counter.calls - self._dist_last,
                    "dist_ops_at_end": dist_counter.ops[self._ops_last :],
                }
            )

    # 16 train batches per rank: several stop agreements (the first after one batch), which
    # are counted per batch, apart from the loader-end reduction
    work = bc.Workload(epochs=1, train_samples=2048, valid_samples=256)
    torch.manual_seed(0)
    model = bc.make_model("tiny")
    callbacks: dict[str, Any] = {
        "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
        "optimizer": dl.OptimizerCallback(metric_key="loss"),
    }
    for i in range(n):
        kind = i % 3
        if kind == 0:
            callbacks[f"m{i}"] = dl.AccuracyCallback(
                input_key="logits", target_key="targets", topk_args=(1, 3)
            )
        elif kind == 1:
            callbacks[f"m{i}"] = dl.PrecisionRecallF1SupportCallback(
                input_key="logits", target_key="targets", num_classes=CLASSES
            )
        else:
            callbacks[f"m{i}"] = dl.ConfusionMatrixCallback(
                input_key="logits", target_key="targets", num_classes=CLASSES
            )
    probe = LoaderCount()
    callbacks["_count"] = probe
    with bc.quiet():
        runner_class().train(
            model=model,
            criterion=nn.CrossEntropyLoss(),
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            loaders=bc.make_loaders(work, bc.make_data(work)),
            engine=engine,
            callbacks=callbacks,
            loggers={},
            num_epochs=2,
        )
    # the steady state is the second epoch: the first loader end of a run also agrees on the
    # batch-metric keys (one all_gather_object), reported apart
    last = [p for p in probe.per_loader if p["epoch"] == 2]
    first = [p for p in probe.per_loader if p["epoch"] == 1]
    return {"metric_callbacks": n, "per_loader": last, "first_epoch": first}


def _worker(rank: int, port: int, folder: str, reps: int) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    engine = _engine_class()(backend="gloo")
    engine.setup()
    direct = [_direct(engine, n, reps) for n in COUNTS]
    dist_counter = DistCounter()
    dist_counter.install()
    runner = [_through_runner(engine, n, folder, dist_counter) for n in COUNTS]
    dist_counter.uninstall()
    engine.barrier()
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps({"direct": direct, "runner": runner}))
    import torch.distributed as dist

    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer timed syncs")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    from ddprun.distributed import find_free_port

    reps = 5 if args.quick else 50
    with tempfile.TemporaryDirectory(prefix="ddprun-bench-sync-") as folder:
        mp.start_processes(
            _worker,
            args=(find_free_port(), folder, reps),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        result = json.loads(Path(folder, "result.json").read_text())
    for row in result["direct"]:
        bc.emit({"section": "sync", "kind": "direct", **row, "target_collectives": 1})
    for row in result["runner"]:
        bc.emit({"section": "sync", "kind": "runner", **row, "target_collectives": 1})


if __name__ == "__main__":
    main()
