"""Asynchronous checkpoint writes: snapshot the state on the caller's thread, write it in the
background, one write at a time.

The caller is blocked only while `snapshot_to_cpu` copies the tensors (a memory copy); then
training may change its parameters while a writer thread serialises, checksums and renames the
file into place (`ddprun.checkpoint.save_targets`: temp file + atomic rename, so a crash
mid-write leaves the previous checkpoint intact). A thread, not a process: the background
write's GIL-holding part (pickling the small object tree) is short next to its tensor writes,
checksums and fsync, which release the GIL (figures in benchmarks/RESULTS.md); a process
would need the snapshot copied once more, or shared, to reach it.

Who writes (rank 0 for files) and the barrier after `wait` are the engine's decision
(`IEngine.save_checkpoint(..., async_=True)` / `IEngine.wait_for_checkpoint`). A backend that
starts its own write and returns a future (torch DCP's ``async_save`` for sharded folders)
hands it over with `AsyncCheckpointWriter.track`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ddprun import checkpoint as ckpt_io

__all__ = ["AsyncCheckpointWriter", "snapshot_to_cpu"]


def snapshot_to_cpu(obj: Any, spare: dict[int, list[Any]] | None = None) -> Any:
    """A deep copy of `obj` whose tensors are fresh CPU copies, safe from later in-place updates.

    Tensors that share a storage (tied weights, views) still share one copied storage, as
    ``torch.save`` would store them; containers keep their types and attributes (a state dict's
    ``_metadata``). Other objects are deep-copied. `spare`: CPU storages by size, to copy into
    instead of allocating (taken out of it).
    """
    return _snapshot(obj, spare if spare is not None else {})[0]


def _snapshot(obj: Any, spare: dict[int, list[Any]]) -> tuple[Any, list[Any]]:
    """`snapshot_to_cpu`, and the CPU storages it filled."""
    memo: dict[int, Any] = {}
    storages: dict[tuple[Any, ...], torch.UntypedStorage] = {}
    _collect(obj, memo, _StorageCopier(storages, spare))
    return copy.deepcopy(obj, memo), list(storages.values())  # deepcopy takes our tensors


class _StorageCopier:
    """Copies each source storage once into a CPU storage, reusing a spare one of its size:
    writing into pages already mapped is several times faster than into fresh memory (page
    faults), and that copy is all the training side waits for."""

    def __init__(self, storages: dict[tuple[Any, ...], Any], spare: dict[int, list[Any]]):
        self.storages, self.spare = storages, spare

    def __call__(self, storage: Any) -> Any:
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        if key not in self.storages:
            free = self.spare.get(storage.nbytes())
            target = free.pop() if free else torch.UntypedStorage(storage.nbytes())
            self.storages[key] = target.copy_(storage)
        return self.storages[key]


def _collect(obj: Any, memo: dict[int, Any], copier: _StorageCopier) -> None:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = _copy_tensor(obj, copier)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _collect(value, memo, copier)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _collect(value, memo, copier)


def _copy_tensor(tensor: torch.Tensor, copier: _StorageCopier) -> torch.Tensor:
    plain = type(tensor) in (torch.Tensor, nn.Parameter)
    if not plain or tensor.layout != torch.strided or tensor.device.type not in ("cpu", "cuda"):
        return tensor.detach().to("cpu", copy=True)  # sparse, quantized, subclasses: no sharing
    copied = torch.empty(0, dtype=tensor.dtype).set_(
        copier(tensor.untyped_storage()), tensor.storage_offset(), tensor.size(), tensor.stride()
    )
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(copied, requires_grad=tensor.requires_grad)
    return copied


class AsyncCheckpointWriter:
    """Runs checkpoint writes in one background thread, one at a time.

    `save` snapshots and queues a file write; `track` adopts a write started elsewhere (a
    future); `wait` joins the pending one and re-raises its error. Every new write waits for
    the previous one first, so writes never overlap. The thread is not a daemon: a process
    that exits normally finishes the pending write first.

    Args:
        keep_buffers: keep the CPU copy of the last written snapshot and copy the next one
            into it (the blocked time drops several-fold; the price is one copy of the state
            held in CPU memory between saves). False: fresh memory every save, freed after it.
    """

    def __init__(self, keep_buffers: bool = True) -> None:
        self.keep_buffers = keep_buffers
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._finalize: Callable[[], Any] | None = None
        self._staged: list[Any] = []  # the pending snapshot's storages
        self._spare: dict[int, list[Any]] = {}  # the last written snapshot's, to reuse

    def __getstate__(self) -> dict[str, Any]:
        # a runner pickled for spawned workers carries no thread, no pending write, no buffers
        return {"keep_buffers": self.keep_buffers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("keep_buffers", True))

    @property
    def pending(self) -> bool:
        """Whether a write was started and not waited for yet."""
        return self._pending is not None

    def save(
        self,
        obj: Any,
        paths: list[str | os.PathLike],
        on_written: Callable[[], Any] | None = None,
    ) -> Future:
        """Wait for the previous write, snapshot `obj` here (`snapshot_to_cpu`), then write it
        in the background to ``paths[0]`` and link the other paths (`ckpt_io.save_targets`);
        `on_written` runs after that, in the background too (e.g. bookkeeping files that must
        not name a checkpoint before it exists)."""
        self.wait()
        snapshot, storages = _snapshot(obj, self._spare)
        self._spare = {}
        future = self.submit(lambda: _write(snapshot, paths, on_written))
        self._staged = storages
        return future

    def submit(self, job: Callable[[], Any]) -> Future:
        """Run `job` in the writer thread once the previous write is done; its future."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ddprun-checkpoint")
        self._pending = self._executor.submit(job)
        return self._pending

    def track(self, future: Future, finalize: Callable[[], Any] | None = None) -> None:
        """Adopt a write started elsewhere (e.g. ``torch.distributed.checkpoint.async_save``'s
        future) as the pending write. `finalize` is handed back by `wait` for the caller to
        run once every rank's part is written (e.g. rank 0 writes the folder manifest after
        the barrier)."""
        self.wait()
        self._pending, self._finalize = future, finalize

    def wait(self) -> Callable[[], Any] | None:
        """Block until the pending write is done; re-raise its error. Returns the `finalize`
        given to `track` (None otherwise). Nothing pending: returns at once."""
        future, finalize = self._pending, self._finalize
        self._pending = self._finalize = None
        if future is None:
            return None
        try:
            future.result()
        finally:  # the write is over: its snapshot's memory may take the next one
            if self.keep_buffers:
                for storage in self._staged:
                    self._spare.setdefault(storage.nbytes(), []).append(storage)
            self._staged = []
        return finalize

    def close(self) -> None:
        """Wait for the pending write, then stop the thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def _write(obj: Any, paths: list[str | os.PathLike], on_written: Callable[[], Any] | None) -> None:
    # looked up at call time: tests and slow-filesystem scripts replace ckpt_io's functions
    ckpt_io.save_targets(obj, paths)
    if on_written is not None:
        on_written()
