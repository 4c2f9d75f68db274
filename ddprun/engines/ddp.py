"""The DDP strategy: join the process group a launcher described; DDP wrapping, loader
sharding, collectives, the cross-rank stop transport, collective-timeout diagnosis.

This module starts no processes: under plain ``python script.py`` the engine's `spawn` hands
the run to ``ddprun.engines.spawn`` (a launcher), whose workers then `setup` here like workers
of ``ddprun``, ``torchrun`` or SLURM.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ddprun import distributed
from ddprun.data.sharding import shard_loader
from ddprun.engines.device import parse_dtype
from ddprun.engines.engine import IEngine, map_components
from ddprun.engines.precision import MixedPrecision
from ddprun.engines.spawn import run_spawned

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DistributedDataParallelEngine(IEngine):
    """Data-parallel training over N processes (gloo on CPU, NCCL on GPUs).

    Args:
        address, port: rendezvous for spawn mode (default 127.0.0.1 and a free port).
        world_size: processes to spawn under plain python (default: visible GPUs, or 2).
        backend: "gloo" or "nccl" (default: nccl with CUDA, else gloo; ``DDPRUN_BACKEND``).
        sync_bn: convert BatchNorm layers to SyncBatchNorm.
        ddp_kwargs: passed to ``DistributedDataParallel`` (e.g. find_unused_parameters).
        process_group_kwargs: passed to ``init_process_group`` (e.g. ``timeout`` as a
            ``datetime.timedelta`` or seconds).
    """

    is_ddp = True

    def __init__(
        self,
        address: str | None = None,
        port: int | str | None = None,
        world_size: int | None = None,
        backend: str | None = None,
        sync_bn: bool = False,
        ddp_kwargs: dict[str, Any] | None = None,
        process_group_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__("cpu")
        self.address = address or "127.0.0.1"
        self.port = int(port) if port is not None else None
        self.spawn_world_size = world_size
        self.backend = backend
        self.sync_bn = sync_bn
        self.ddp_kwargs = dict(ddp_kwargs or {})
        self.process_group_kwargs = dict(process_group_kwargs or {})
        self.rank, self.local_rank, self.world_size = -1, -1, 1
        self.timeout: datetime.timedelta | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, "
            f"device={str(self.device)!r}, precision={self.precision.name})"
        )

    # ----------------------------------------------------------------- process
    def needs_spawn(self) -> bool:
        """True under plain ``python``: no launcher environment and no group yet."""
        return not distributed.is_launched() and not dist.is_initialized()

    def spawn(self, runner: IRunner) -> None:
        """Run ``runner.run()`` in spawned workers (``ddprun.engines.spawn``); rank 0's model
        and final metrics come back into `runner`."""
        run_spawned(runner, self.spawn_world_size, self.address, self.port)

    def setup(self) -> None:
        """Join the process group described by the environment (one per run)."""
        if not dist.is_initialized():
            kwargs = dict(self.process_group_kwargs)
            timeout = kwargs.pop("timeout", None) or collective_timeout()
            if isinstance(timeout, (int, float)):
                timeout = datetime.timedelta(seconds=timeout)
            self.timeout = timeout
            distributed.init_process_group(backend=self.backend, timeout=timeout, **kwargs)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        cuda = dist.get_backend() == "nccl" and torch.cuda.is_available()
        self._device = torch.device(
            f"cuda:{distributed.cuda_index(self.local_rank)}" if cuda else "cpu"
        )
        if self.sync_bn and self.device.type != "cuda":
            raise ValueError(
                f"sync_bn=True needs CUDA devices (SyncBatchNorm runs on GPUs), but rank "
                f"{self.rank} computes on {self.device}; drop sync_bn, or run on GPUs (NCCL)"
            )
        self._configure_precision()
        # control messages (stop agreement) on their own CPU group: never a device sync
        self._control_group = dist.new_group(backend="gloo")
        # waiting for rank 0's checkpoint write: a CPU group with its own, longer timeout
        self._file_group = dist.new_group(backend="gloo", timeout=checkpoint_timeout())
        self._stop_buffers = [torch.zeros(2, dtype=torch.int64) for _ in range(2)]
        self._stop_pending: Any = None
        self._stop_calls = 0

    def _configure_precision(self) -> None:
        """fp32 here; the AMP engine builds its precision for the rank's device."""

    def teardown(self) -> None:
        """Leave the group cleanly (see ``ddprun.distributed.shutdown_process_group``)."""
        distributed.shutdown_process_group()

    # -------------------------------------------------------------- components
    def prepare_criterion(self, criterion: Any) -> Any:
        """Criteria with trainable parameters (learnable loss weights, a metric-learning head
        inside the loss) are wrapped in DDP like models, so their gradients are averaged and
        they stay identical on every rank; the others only move to the device."""

        def prepare(part: Any) -> Any:
            if not isinstance(part, nn.Module):
                return part
            # moves it; wraps only when it has trainable parameters; a compiled criterion is
            # compiled again around its DDP wrapper, as models are
            return self._prepare_module(part)

        return map_components(criterion, prepare)

    def _wrap(self, module: nn.Module) -> nn.Module:
        """To the device, SyncBatchNorm if asked, DDP if it has trainable params (a compiled
        model's original module: `prepare_model` compiles the DDP module again)."""
        module = self.unwrap(module).to(self.device)
        if not any(p.requires_grad for p in module.parameters()):
            return module  # frozen modules need no gradient sync
        if self.sync_bn:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        kwargs = dict(self.ddp_kwargs)
        if self.device.type == "cuda":
            kwargs.setdefault("device_ids", [self.device.index])
        return nn.parallel.DistributedDataParallel(module, **kwargs)

    def prepare_loaders(self, loaders: Mapping[str, DataLoader], seed: int) -> dict[str, Any]:
        """Shard every loader across ranks (see ``ddprun.data.sharding``): training loaders keep
        the same batch count on every rank, other loaders count every sample exactly once."""
        return {key: self._shard(key, loader, seed) for key, loader in loaders.items()}

    def _shard(self, key: str, loader: Any, seed: int) -> Any:
        return shard_loader(loader, key, self.rank, self.world_size, seed)

    @contextlib.contextmanager
    def no_sync(self, model: Any) -> Iterator[None]:
        """Skip DDP's gradient all-reduce inside (accumulation steps); unwrapped modules,
        e.g. frozen ones, have nothing to sync and pass through."""
        model = getattr(model, "_orig_mod", model)  # compiled(DDP(module)): the DDP inside
        if isinstance(model, nn.parallel.DistributedDataParallel):
            with model.no_sync():
                yield
        else:
            yield

    # ------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op == "mean":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor.div_(self.world_size)
        dist.all_reduce(tensor, op=_OPS[op])
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return parts

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree_to_stop(self, signum: int | None, every: int = 1) -> tuple[int | None, int | None]:
        """Pipelined MAX all-reduce of ``[stop signal, proposed batches to the next check]`` on
        the CPU control group.

        Returns the agreement started at the previous call (``(None, None)`` when none is in
        flight: the first call, or the first after `drain_stop_agreement`) and starts a new one,
        so no rank blocks on it; every rank gets the same answer at the same call.
        """
        agreed = self._collect_stop_agreement()
        buffer = self._stop_buffers[self._stop_calls % 2]
        self._stop_calls += 1
        buffer[0], buffer[1] = signum or 0, every
        work = dist.all_reduce(
            buffer, op=dist.ReduceOp.MAX, group=self._control_group, async_op=True
        )
        self._stop_pending = (buffer, work)
        return agreed

    def drain_stop_agreement(self) -> tuple[int | None, int | None]:
        """Wait for the agreement still in flight (if any) and return it."""
        return self._collect_stop_agreement()

    def _collect_stop_agreement(self) -> tuple[int | None, int | None]:
        if self._stop_pending is None:
            return None, None
        buffer, work = self._stop_pending
        self._stop_pending = None
        work.wait()
        signum, every = buffer.tolist()  # a CPU tensor: no device sync
        return signum or None, every

    def explain_failure(self, error: BaseException) -> BaseException:
        """Turn a collective timeout into an error naming the rank(s) that stopped answering.

        Every rank whose collective timed out says so through the group's store; ranks that
        never say so within a few seconds were not in the collective (hung, or busy elsewhere).
        """
        if not _is_timeout(error):
            return error
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(f"ddprun/timed_out/{self.rank}", "1")
            missing = _wait_for_ranks(store, self.world_size, seconds=3.0)
        except Exception:  # the store itself may be gone with the failing peer
            return error
        seconds = self.timeout.total_seconds() if self.timeout else float("nan")
        who = f"rank(s) {missing} stopped answering" if missing else "every rank timed out"
        return CollectiveTimeoutError(
            f"a collective timed out after {seconds:g}s on rank {self.rank}: {who} "
            f"(set DDPRUN_COLLECTIVE_TIMEOUT or process_group_kwargs['timeout'] to change "
            f"the limit). Original error: {error}"
        )

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def checkpoint_barrier(self) -> None:
        """Wait for rank 0's checkpoint write on the file group (DDPRUN_CHECKPOINT_TIMEOUT)."""
        dist.barrier(group=self._file_group)


class DistributedDataParallelAMPEngine(DistributedDataParallelEngine):
    """DDP with autocast: fp16 + GradScaler on CUDA, bf16 on CPU (by default).

    Takes the DDP engine's arguments plus `dtype` and `scaler_kwargs`.
    """

    def __init__(
        self,
        *args: Any,
        dtype: torch.dtype | str | None = None,
        scaler_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._dtype, self._scaler_kwargs = parse_dtype(dtype), scaler_kwargs
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = MixedPrecision(device_type, self._dtype, scaler_kwargs)

    def _configure_precision(self) -> None:
        # the device (and so the autocast type and the scaler) is known only after setup
        self.precision = MixedPrecision(self.device.type, self._dtype, self._scaler_kwargs)


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time; the message names the ranks that were missing."""


def collective_timeout() -> datetime.timedelta:
    """The collective timeout: DDPRUN_COLLECTIVE_TIMEOUT seconds, default 600 (torch's gloo
    default is 30 minutes: too long to notice a hung rank)."""
    return datetime.timedelta(seconds=float(os.environ.get("DDPRUN_COLLECTIVE_TIMEOUT", "600")))


def checkpoint_timeout() -> datetime.timedelta:
    """How long ranks wait for rank 0's checkpoint write: DDPRUN_CHECKPOINT_TIMEOUT seconds,
    default 1800 (a large model on a slow shared filesystem), apart from the collective
    timeout."""
    return datetime.timedelta(seconds=float(os.environ.get("DDPRUN_CHECKPOINT_TIMEOUT", "1800")))


#: How collective timeouts read: gloo ("Timed out waiting ..."), NCCL's watchdog ("... ran for
#: N milliseconds before timing out") and the error NCCL ops raise once the watchdog aborted
#: the communicators (TORCH_NCCL_ASYNC_ERROR_HANDLING=2, set by ddprun when unset).
_TIMEOUT_MARKS = ("timed out", "before timing out", "collective operation timeout")


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(mark in text for mark in _TIMEOUT_MARKS)


def _wait_for_ranks(store: Any, world_size: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    keys = {rank: f"ddprun/timed_out/{rank}" for rank in range(world_size)}
    while True:
        missing = [rank for rank, key in keys.items() if not store.check([key])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)
