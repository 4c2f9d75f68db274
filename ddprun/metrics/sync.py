"""Cross-rank metric sync: pack every metric's states, reduce them in one collective per kind, unpack.

`synchronized(metrics, collectives)` issues, whatever the number of metrics:

- one `all_reduce("sum")` over a single float64 buffer holding every "sum" state of every metric,
  plus, for "cat" states, each rank's local length written at slot [rank] of a world_size-long
  zero segment (so every rank learns every length from that same all-reduce);
- at most one `all_reduce("max")` over every "max" state and every negated "min" state;
- at most one `all_gather` over every "cat" state, each padded to its longest length over ranks,
  then trimmed and concatenated in rank order.

Buffers are float64: int64 counts are exact up to 2**53 and float32 values are exact, so casting
back to each state's dtype restores them bit for bit. The buffer lives on the device of the first
state, so the collectives must accept tensors there (CPU for gloo, CUDA for NCCL). Every rank must
pass the same metrics in the same order, and "cat" states must agree on all but the first dimension.

Metrics never see `torch.distributed`: the engine passes an object that satisfies `Collectives`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ddprun.metrics.metric import Metric

__all__ = ["Collectives", "CountingCollectives", "SyncReport", "synchronized"]


class Collectives(Protocol):
    """What the sync layer needs from the engine: this rank, the world size and two collectives."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Reduces `tensor` in place across ranks with op "sum", "max" or "min"; returns it."""
        ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's `tensor` (same shape on every rank), in rank order."""
        ...


@dataclass
class SyncReport:
    """How many collectives one `synchronized` block issued (for tests and benchmarks)."""

    all_reduce_calls: int = 0
    all_gather_calls: int = 0
    ops: list[str] = field(default_factory=list)


class CountingCollectives:
    """Wraps a `Collectives` and counts the calls that pass through it.

    Args:
        inner: the collectives that do the work.
    """

    def __init__(self, inner: Collectives) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.report = SyncReport()

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Counts, then forwards to the wrapped `all_reduce`."""
        self.report.all_reduce_calls += 1
        self.report.ops.append(f"all_reduce:{op}")
        return self.inner.all_reduce(tensor, op)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Counts, then forwards to the wrapped `all_gather`."""
        self.report.all_gather_calls += 1
        self.report.ops.append("all_gather")
        return self.inner.all_gather(tensor)


class _Entry(NamedTuple):
    """One state of one metric: where it goes back to, and its local value."""

    index: int
    name: str
    state: Tensor


@contextmanager
def synchronized(
    metrics: Sequence[Metric], collectives: Collectives | None
) -> Iterator[SyncReport]:
    """Makes `metrics` hold the states of all ranks combined for the duration of the block.

    Inside the block `compute()` and `compute_key_value()` give global values; on exit every
    metric gets back its local state tensors (the very same objects), so computing again is safe
    and a second sync does not double count. Without collectives, or with a world of one, it
    does nothing.

    Args:
        metrics: the metrics to sync; the same ones in the same order on every rank.
        collectives: the engine's collectives, or None when not distributed.

    Yields:
        A `SyncReport` counting the collectives issued.
    """
    report = SyncReport()
    if collectives is None or collectives.world_size == 1:
        yield report
        return
    unique = list({id(metric): metric for metric in metrics}.values())
    saved = [metric.get_states() for metric in unique]
    try:
        for metric, states in zip(unique, _global_states(unique, collectives, report)):
            metric.replace_states(states)
        yield report
    finally:
        for metric, states in zip(unique, saved):
            metric.replace_states(states)


def _global_states(
    metrics: Sequence[Metric], collectives: Collectives, report: SyncReport
) -> list[dict[str, Tensor]]:
    """Runs the collectives and returns, per metric, its states combined over all ranks."""
    by_kind: dict[str, list[_Entry]] = {"sum": [], "max": [], "min": [], "cat": []}
    for index, metric in enumerate(metrics):
        # get_states, not attributes: an adapter (e.g. TorchMetric) presents its states there
        states = metric.get_states()
        for name, reduction in metric.reductions.items():
            by_kind[reduction].append(_Entry(index, name, states[name]))
    device = next((e.state.device for kind in by_kind.values() for e in kind), torch.device("cpu"))
    results: list[dict[str, Tensor]] = [{} for _ in metrics]
    lengths = _reduce_sums(by_kind["sum"], by_kind["cat"], collectives, device, report, results)
    _reduce_extremes(by_kind["max"], by_kind["min"], collectives, device, report, results)
    _gather_cats(by_kind["cat"], lengths, collectives, device, report, results)
    return results


def _pack(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Flattens tensors into one float64 buffer on `device`."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])


def _unpack(buffer: Tensor, entries: Sequence[_Entry], results: list[dict[str, Tensor]]) -> None:
    """Splits a packed buffer back into states of each entry's shape, dtype and device."""
    offset = 0
    for entry in entries:
        size = entry.state.numel()
        chunk = buffer[offset : offset + size].view(entry.state.shape)
        results[entry.index][entry.name] = chunk.to(entry.state.device, entry.state.dtype)
        offset += size


def _reduce_sums(
    sums: Sequence[_Entry],
    cats: Sequence[_Entry],
    collectives: Collectives,
    device: torch.device,
    report: SyncReport,
    results: list[dict[str, Tensor]],
) -> list[list[int]]:
    """One sum all-reduce for every "sum" state and the lengths of every "cat" state.

    Returns:
        For each "cat" state, its first-dimension length on every rank, in rank order.
    """
    if not sums and not cats:
        return []
    lengths = torch.zeros(len(cats), collectives.world_size, dtype=torch.float64)
    lengths[:, collectives.rank] = torch.tensor([float(e.state.shape[0]) for e in cats])
    buffer = torch.cat([_pack([e.state for e in sums], device), lengths.reshape(-1).to(device)])
    buffer = collectives.all_reduce(buffer, "sum")
    report.all_reduce_calls += 1
    report.ops.append("all_reduce:sum")
    _unpack(buffer, sums, results)
    all_lengths = buffer[buffer.numel() - lengths.numel() :]
    return all_lengths.view(lengths.shape).long().tolist()


def _reduce_extremes(
    maxes: Sequence[_Entry],
    mins: Sequence[_Entry],
    collectives: Collectives,
    device: torch.device,
    report: SyncReport,
    results: list[dict[str, Tensor]],
) -> None:
    """One max all-reduce for every "max" state and every "min" state (as max of the negation)."""
    if not maxes and not mins:
        return
    buffer = _pack([e.state for e in maxes] + [-e.state.double() for e in mins], device)
    buffer = collectives.all_reduce(buffer, "max")
    report.all_reduce_calls += 1
    report.ops.append("all_reduce:max")
    buffer[sum(e.state.numel() for e in maxes) :].neg_()
    _unpack(buffer, [*maxes, *mins], results)


def _gather_cats(
    cats: Sequence[_Entry],
    lengths: Sequence[Sequence[int]],
    collectives: Collectives,
    device: torch.device,
    report: SyncReport,
    results: list[dict[str, Tensor]],
) -> None:
    """One all-gather for every "cat" state, padded to its longest length, then trimmed and joined."""
    longest = [max(per_rank) for per_rank in lengths]
    padded = [_pad(entry.state, size) for entry, size in zip(cats, longest)]
    if sum(p.numel() for p in padded) == 0:
        # Every rank knows every length, so they all skip the gather together.
        for entry in cats:
            results[entry.index][entry.name] = entry.state.clone()
        return
    gathered = collectives.all_gather(_pack(padded, device))
    report.all_gather_calls += 1
    report.ops.append("all_gather")
    offset = 0
    for entry, size, per_rank in zip(cats, longest, lengths):
        numel = size * math.prod(entry.state.shape[1:])
        pieces = [
            buffer[offset : offset + numel].view(size, *entry.state.shape[1:])[:count]
            for buffer, count in zip(gathered, per_rank)
        ]
        results[entry.index][entry.name] = torch.cat(pieces).to(
            entry.state.device, entry.state.dtype
        )
        offset += numel


def _pad(state: Tensor, length: int) -> Tensor:
    """`state` zero-padded along its first dimension to `length` rows, as float64."""
    padded = torch.zeros(length, *state.shape[1:], dtype=torch.float64, device=state.device)
    padded[: state.shape[0]] = state
    return padded
