"""The sync layer: N ranks (threads, then real gloo processes) equal one process on all the data.

Every rank runs `_rank_run` on its uneven shard of 1001 samples; the parent compares every rank's
synced values with one process that saw every batch. The same `_rank_run` runs over an in-process
fake (`_ThreadCollectives`) and over torch.distributed with gloo (`_TorchCollectives`).
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ddprun.metrics import (
    AccuracyMetric,
    AdditiveMetric,
    ConfusionMatrixMetric,
    Metric,
    MulticlassPrecisionRecallF1SupportMetric,
    synchronized,
)
from ddprun.metrics.sync import Collectives, CountingCollectives

NUM_SAMPLES = 1001
NUM_CLASSES = 7
BATCH_SIZE = 64
MAIN_SYNC_OPS = ["all_reduce:sum", "all_reduce:max", "all_gather"]


class _ToyMetric(Metric):
    """Exercises the reductions no shipped metric uses: "cat" (with a trailing dim), "max", "min"."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("targets", torch.zeros(0, dtype=torch.int64), "cat")
        self.add_state("scores", torch.zeros(0, 2), "cat")
        self.add_state("top", torch.tensor(-math.inf), "max")
        self.add_state("bottom", torch.tensor(math.inf), "min")
        self.add_state("count", torch.zeros((), dtype=torch.int64), "sum")

    def update(self, logits: Tensor, targets: Tensor) -> None:
        self.targets = torch.cat([self.targets, targets])
        self.scores = torch.cat([self.scores, logits[:, :2]])
        self.top = torch.maximum(self.top, logits.max())
        self.bottom = torch.minimum(self.bottom, logits[:, 1:].min())
        self.count.add_(targets.numel())

    def compute(self) -> dict[str, Any]:
        return {"targets": self.targets.tolist(), "scores": self.scores.tolist()}

    def compute_key_value(self) -> dict[str, float]:
        return {"max": self.top.item(), "min": self.bottom.item(), "count": float(self.count)}


# ---------------------------------------------------------------- what every rank does


def _dataset() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1234)
    logits = torch.randn(NUM_SAMPLES, NUM_CLASSES, generator=generator)
    logits[:, 0] -= 50.0  # class 0: never predicted
    targets = torch.randint(
        0, NUM_CLASSES - 1, (NUM_SAMPLES,), generator=generator
    )  # last: never a target
    return logits, targets


def _batches(world_size: int, rank: int) -> list[tuple[Tensor, Tensor]]:
    """This rank's contiguous shard (uneven: 1001 does not divide), in batches of 64."""
    logits, targets = _dataset()
    index = torch.tensor_split(torch.arange(NUM_SAMPLES), world_size)[rank]
    return list(zip(logits[index].split(BATCH_SIZE), targets[index].split(BATCH_SIZE)))


def _make_metrics() -> dict[str, Metric]:
    return {
        "loss": AdditiveMetric(metric_key="loss"),
        "accuracy": AccuracyMetric(topk=(1, 3, 5)),
        "prf0": MulticlassPrecisionRecallF1SupportMetric(NUM_CLASSES, zero_division=0),
        "prf1": MulticlassPrecisionRecallF1SupportMetric(NUM_CLASSES, zero_division=1),
        "confusion": ConfusionMatrixMetric(NUM_CLASSES),
        "confusion_norm": ConfusionMatrixMetric(NUM_CLASSES, normalize=True),
        "toy": _ToyMetric(),
    }


def _update(metrics: dict[str, Metric], batches: list[tuple[Tensor, Tensor]]) -> None:
    for logits, targets in batches:
        loss = F.cross_entropy(logits, targets)
        metrics["loss"].update(loss, targets.shape[0])
        for key in ("accuracy", "prf0", "prf1", "confusion", "confusion_norm", "toy"):
            metrics[key].update(logits, targets)


def _values(metrics: dict[str, Metric]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, metric in metrics.items():
        values.update({f"{key}:{name}": v for name, v in metric.compute_key_value().items()})
    values["confusion:matrix"] = metrics["confusion"].compute().tolist()
    values["confusion_norm:matrix"] = metrics["confusion_norm"].compute().tolist()
    values.update({f"toy:{name}": v for name, v in metrics["toy"].compute().items()})
    return values


def _count_all_reduces(num_metrics: int, batches: list, collectives: Collectives) -> list[int]:
    """Syncs `num_metrics` metrics of mixed kinds: [reported all-reduces, counted, all-gathers]."""
    kinds: list[Callable[[], Metric]] = [
        AdditiveMetric,
        AccuracyMetric,
        lambda: MulticlassPrecisionRecallF1SupportMetric(NUM_CLASSES),
        lambda: ConfusionMatrixMetric(NUM_CLASSES),
    ]
    metrics = [kinds[i % len(kinds)]() for i in range(num_metrics)]
    logits, targets = batches[0]
    for metric in metrics:
        args = (1.0, 3) if isinstance(metric, AdditiveMetric) else (logits, targets)
        metric.update(*args)
    counting = CountingCollectives(collectives)
    with synchronized(metrics, counting) as report:
        pass
    counted = counting.report
    return [report.all_reduce_calls, counted.all_reduce_calls, counted.all_gather_calls]


def _rank_run(rank: int, world_size: int, collectives: Collectives) -> dict[str, Any]:
    """Everything one rank does: update on its shard, sync twice, record values and call counts."""
    batches = _batches(world_size, rank)
    metrics = _make_metrics()
    _update(metrics, batches)
    local_values = _values(metrics)
    local_states = {key: m.get_states() for key, m in metrics.items()}
    local_copies = {key: m.state_dict() for key, m in metrics.items()}
    counting = CountingCollectives(collectives)
    with synchronized(list(metrics.values()), counting) as report:
        first = _values(metrics)
    with synchronized(list(metrics.values()), counting):
        second = _values(metrics)
    restored = all(
        state is local_states[key][name] and torch.equal(state, local_copies[key][name])
        for key, metric in metrics.items()
        for name, state in metric.get_states().items()
    )
    return {
        "values": first,
        "second": second,
        "restored": restored,
        "local_unchanged": _values(metrics) == local_values,
        "report_ops": report.ops,
        "counted_ops": counting.report.ops,
        "counts": {n: _count_all_reduces(n, batches, collectives) for n in (1, 5, 20)},
    }


def _reference(world_size: int) -> dict[str, Any]:
    """One process that sees every rank's batches, in rank order."""
    metrics = _make_metrics()
    _update(metrics, [b for rank in range(world_size) for b in _batches(world_size, rank)])
    return _values(metrics)


def _assert_matches(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)
    assert got["toy:targets"] == expected["toy:targets"]
    assert got["confusion:matrix"] == expected["confusion:matrix"]


def _check_ranks(results: list[dict[str, Any]], world_size: int) -> None:
    expected = _reference(world_size)
    for rank, result in enumerate(results):
        _assert_matches(result["values"], expected)
        _assert_matches(result["second"], expected)  # a second sync does not double count
        assert result["restored"], f"rank {rank}: local states not restored"
        assert result["local_unchanged"], f"rank {rank}: local values changed"
        assert result["report_ops"] == MAIN_SYNC_OPS
        assert result["counted_ops"] == MAIN_SYNC_OPS * 2
        assert result["counts"] == {1: [1, 1, 0], 5: [1, 1, 0], 20: [1, 1, 0]}
    assert expected["toy:count"] == NUM_SAMPLES


# ---------------------------------------------------------------- an in-process fake world


class _ThreadWorld:
    """N threads meeting at a barrier: each deposits its tensor, then all read every deposit."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[Tensor | None] = [None] * world_size

    def exchange(self, rank: int, tensor: Tensor) -> list[Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        everyone = [slot.clone() for slot in self.slots]
        self.barrier.wait()  # nobody deposits the next tensor before all have read this one
        return everyone


class _ThreadCollectives:
    def __init__(self, world: _ThreadWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.world_size = world.world_size

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        stacked = torch.stack(self.world.exchange(self.rank, tensor))
        reduced = {"sum": stacked.sum, "max": stacked.amax, "min": stacked.amin}[op](0)
        return tensor.copy_(reduced)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        everyone = self.world.exchange(self.rank, tensor)
        assert len({t.shape for t in everyone}) == 1, "all_gather needs one shape on every rank"
        return everyone


def _run_threads(world_size: int, fn: Callable[[int, int, Collectives], Any]) -> list[Any]:
    world = _ThreadWorld(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, world_size, _ThreadCollectives(world, rank))
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_fake_world_equals_single_process(world_size):
    _check_ranks(_run_threads(world_size, _rank_run), world_size)


def test_cat_states_with_an_empty_rank():
    lengths = [5, 0, 3]

    def run(rank: int, world_size: int, collectives: Collectives) -> tuple[list, list, int]:
        metric = _ToyMetric()
        if lengths[rank]:
            logits = torch.full((lengths[rank], 3), float(rank))
            metric.update(logits, torch.arange(lengths[rank]) + 10 * rank)
        with synchronized([metric, metric], collectives) as report:  # duplicates count once
            targets = metric.targets.tolist()
            extremes = [metric.top.item(), metric.bottom.item()]
        return targets, extremes, report.all_gather_calls

    for targets, extremes, gathers in _run_threads(3, run):
        assert targets == [0, 1, 2, 3, 4, 20, 21, 22]
        assert extremes == [2.0, 0.0]
        assert gathers == 1


def test_all_empty_cat_states_skip_the_gather():
    def run(rank: int, world_size: int, collectives: Collectives) -> tuple[int, int]:
        with synchronized([_ToyMetric()], collectives) as report:
            pass
        return report.all_reduce_calls, report.all_gather_calls

    assert _run_threads(2, run) == [(2, 0), (2, 0)]


def test_large_int64_counts_are_exact():
    def run(rank: int, world_size: int, collectives: Collectives) -> int:
        metric = ConfusionMatrixMetric(2)
        metric.matrix.fill_(2**50 + rank)
        with synchronized([metric], collectives):
            return int(metric.compute()[0, 0])

    assert _run_threads(2, run) == [2**51 + 1] * 2


def test_no_collectives_or_world_of_one_do_nothing(make_data):
    class _Solo:
        rank, world_size = 0, 1

        def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
            raise AssertionError("no collective expected")

        def all_gather(self, tensor: Tensor) -> list[Tensor]:
            raise AssertionError("no collective expected")

    metric = AccuracyMetric()
    metric.update(*make_data(0))
    before = metric.compute()
    for collectives in (None, _Solo()):
        with synchronized([metric], collectives) as report:
            assert metric.compute() == before
        assert report.all_reduce_calls == report.all_gather_calls == 0


def test_local_state_restored_after_an_error():
    def run(rank: int, world_size: int, collectives: Collectives) -> bool:
        metric = AdditiveMetric()
        metric.update(float(rank), 1)
        local = metric.weighted_sum
        with pytest.raises(RuntimeError), synchronized([metric], collectives):
            raise RuntimeError("inside the block")
        return metric.weighted_sum is local and local.item() == rank

    assert _run_threads(2, run) == [True, True]


# ---------------------------------------------------------------- real processes over gloo


class _TorchCollectives:
    """The adapter an engine would provide, over the default torch.distributed group."""

    _OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        dist.all_reduce(tensor, op=self._OPS[op])
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor)
        return gathered


def _child(rank: int, world_size: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=45),
    )
    try:
        result = _rank_run(rank, world_size, _TorchCollectives())
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", (2, 3))
def test_gloo_processes_equal_single_process(world_size, tmp_path):
    context = torch.multiprocessing.start_processes(
        _child,
        args=(world_size, _free_port(), str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    try:
        while not context.join(timeout=50):
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=5)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    _check_ranks(results, world_size)
