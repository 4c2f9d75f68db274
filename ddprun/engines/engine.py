"""IEngine: the one place that knows devices, wrapping, precision, collectives and who writes files.

Runners and callbacks talk to hardware and to other ranks only through this interface, so the
same runner code runs on one CPU, one GPU or N processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ddprun import checkpoint as ckpt_io
from ddprun.checkpoint_async import AsyncCheckpointWriter
from ddprun.checkpoint_manifest import newest_intact
from ddprun.data.sharding import seeded_shuffle
from ddprun.engines.compiled import split_compiled, strip_parallel
from ddprun.engines.precision import Precision
from ddprun.utils import any2device


def map_components(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply `fn` to a component, or to every value of a dict of components."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return {key: fn(value) for key, value in obj.items()}
    return fn(obj)


class IEngine:
    """Owns the device, model wrapping, backward/step (through its `Precision`), collectives
    and checkpoint writing. Single-process defaults; the DDP engines override the rest."""

    rank: int = -1
    local_rank: int = -1
    world_size: int = 1
    is_ddp: bool = False
    _checkpoint_writer: AsyncCheckpointWriter | None = None  # created on first use
    _checkpoint_pending: bool = False  # an async save not waited for (set on every rank)

    def __init__(
        self, device: str | torch.device | None = None, precision: Precision | None = None
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.precision = precision or Precision()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={str(self.device)!r}, precision={self.precision.name})"
        )

    # ----------------------------------------------------------------- process
    @property
    def device(self) -> torch.device:
        """The torch device this process computes on."""
        return self._device

    @property
    def is_master(self) -> bool:
        """True on rank 0, or when not distributed: the process that logs and writes files."""
        return self.rank <= 0

    def needs_spawn(self) -> bool:
        """Whether `run()` must start worker processes itself (DDP under plain python)."""
        return False

    def setup(self) -> None:
        """Join the process group (DDP); nothing to do for one process."""

    def teardown(self) -> None:
        """Leave the process group (DDP)."""

    # -------------------------------------------------------------- components
    def prepare_model(self, model: Any) -> Any:
        """Move the model (or each dict entry) to the device and wrap it as the engine needs.

        A compiled model (``torch.compile``) is taken apart: the engine wraps the original
        module and the wrapper is compiled again with the same options, the order torch
        recommends for DDP (see `ddprun.engines.compiled`).
        """
        return map_components(model, self._prepare_module)

    def _prepare_module(self, module: Any) -> Any:
        plain, compile_again = split_compiled(module)
        return compile_again(self._wrap(plain))

    def _wrap(self, module: nn.Module) -> nn.Module:
        """One plain module on the device, in this engine's wrapper (none here)."""
        return module.to(self.device)

    def prepare_criterion(self, criterion: Any) -> Any:
        """Move criteria holding buffers (class weights) to the device."""
        move = lambda c: c.to(self.device) if isinstance(c, nn.Module) else c  # noqa: E731
        return map_components(criterion, move)

    def prepare_loaders(
        self, loaders: Mapping[str, DataLoader], seed: int
    ) -> dict[str, DataLoader]:
        """Give loaders the samplers this engine needs (DDP shards them). One process: a
        ``shuffle=True`` training loader draws its order from the run's seed, as a DDP rank
        does (`ddprun.data.sharding.seeded_shuffle`), so one process with batch N*b trains on
        the same samples per step as N ranks with batch b; other loaders are unchanged."""
        return {
            key: seeded_shuffle(loader, seed) if key.startswith("train") else loader
            for key, loader in loaders.items()
        }

    def unwrap(self, model: Any) -> Any:
        """The module(s) without the engine's wrappers (DataParallel, DDP). A compiled model
        stays compiled, around its plain module, so later stages and inference keep the
        compilation; checkpoints take states from `checkpoint.unwrap_module` (no prefix)."""
        return map_components(model, strip_parallel)

    def prepare_optimizer(self, optimizer: Any) -> Any:
        """The optimizer(s) made for the model before `prepare_model`, fit for the prepared
        model. Most engines keep the parameters, so the optimizer is returned as it is; the
        FSDP engine replaces them with sharded ones and points the optimizer at those."""
        return optimizer

    def move(self, batch: Any) -> Any:
        """Move a batch (tensors inside dicts/lists/tuples) to the device."""
        device = self._device
        if type(batch) is list or type(batch) is tuple:  # the loader's (inputs, targets)
            for item in batch:
                if type(item) is not torch.Tensor or item.device != device:
                    break
            else:
                return batch  # all on the device already: no copy, no call per item
        return any2device(batch, device)

    # ------------------------------------------------------------------- steps
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (mixed precision when configured)."""
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate, scaling the loss when the precision needs it."""
        self.precision.backward(loss)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to true scale before clipping."""
        self.precision.unscale(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step the optimizer (through the scaler when there is one)."""
        self.precision.step(optimizer)

    def finish_steps(self) -> None:
        """Called at the end of a training loader: apply what the optimizer steps still owe
        (AMP: the one GradScaler update of the last iteration, which waits for every
        optimizer of that iteration to step)."""
        self.precision.finish_steps()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear gradients of the optimizer's parameters (set to None: no memset)."""
        optimizer.zero_grad(set_to_none=True)

    def steps_as_torch(self) -> bool:
        """Whether `backward`, `optimizer_step` and `zero_grad` are exactly ``loss.backward()``,
        ``optimizer.step()`` and ``optimizer.zero_grad(set_to_none=True)`` (fp32 and none of
        them replaced), so OptimizerCallback may call torch directly: three layers less a batch."""
        own = ((self, IEngine, ("backward", "optimizer_step", "zero_grad")),
               (self.precision, Precision, ("backward", "step")))  # fmt: skip
        return all(
            getattr(getattr(obj, name), "__func__", None) is getattr(base, name)
            for obj, base, names in own for name in names
        )  # fmt: skip

    @contextlib.contextmanager
    def no_sync(self, model: Any) -> Iterator[None]:
        """Skip gradient all-reduce inside (gradient accumulation); nothing to skip here."""
        yield

    def finish_accumulation(self, models: Sequence[Any]) -> None:
        """Reduce the gradients accumulated under `no_sync` when no synchronising backward
        will come (an accumulation window still open at a loader's end): DDP averages each
        parameter's rank-local gradient across ranks, as its step batch would have; a
        parameter without a gradient on every rank keeps none. One process: nothing to do."""
        if self.world_size > 1:
            average_local_gradients(self, models)

    # ------------------------------------------------------------- collectives
    @property
    def collectives(self) -> IEngine | None:
        """What the metric sync layer reduces with: None when there is only one process."""
        return self if self.world_size > 1 else None

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` in place across ranks ("sum", "max", "min", "mean")."""
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape everywhere), in rank order."""
        return [tensor]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order (keep tensors on the CPU)."""
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` as rank `src` has it."""
        return obj

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's picklable `obj` on rank `dst`, in rank order; None on the other ranks
        (keep tensors on the CPU). With more than one process it needs the live default group,
        which only the DDP engines join."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank."""

    def explain_failure(self, error: BaseException) -> BaseException:
        """A clearer error for `error` where the engine knows more (e.g. who hung)."""
        return error

    def agree_to_stop(self, signum: int | None, every: int = 1) -> tuple[int | None, int | None]:
        """The stop signal to act on now, the same on every rank (or None), and the number of
        batches to the next check, the largest any rank proposed (`every`).

        The DDP engine answers with the agreement started at its previous call, keeping the
        collective off the critical path; here there is nobody to agree with.
        """
        return signum, every

    def drain_stop_agreement(self) -> tuple[int | None, int | None]:
        """The agreement still in flight (DDP), as `agree_to_stop` returns it, else
        ``(None, None)``."""
        return None, None

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Engine state that belongs in checkpoints (the AMP scaler)."""
        return self.precision.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`."""
        self.precision.load_state_dict(state)

    def pack_checkpoint(self, model=None, criterion=None, optimizer=None, scheduler=None, **extra):
        """A checkpoint dict of unwrapped component states plus the scaler state and `extra`."""
        packed = ckpt_io.pack_checkpoint(model, criterion, optimizer, scheduler, **extra)
        packed["scaler_state_dict"] = self.state_dict().get("scaler")
        return packed

    def unpack_checkpoint(
        self,
        checkpoint,
        model=None,
        criterion=None,
        optimizer=None,
        scheduler=None,
        source: str = "checkpoint",
    ) -> None:
        """Load component states (and the scaler state, when both sides have one)."""
        ckpt_io.unpack_checkpoint(checkpoint, model, criterion, optimizer, scheduler, source)
        if checkpoint.get("scaler_state_dict") is not None:
            self.load_state_dict({"scaler": checkpoint["scaler_state_dict"]})

    def save_checkpoint(
        self,
        obj: Any,
        path: str | Path | Sequence[str | Path],
        async_: bool = False,
        on_written: Callable[[], Any] | None = None,
    ) -> Future | None:
        """Write `obj` atomically on the master only, serialised once: further paths (best,
        an epoch file) become hard links of the first (or copies), every one carrying the
        checksummed manifest; `on_written` then runs on the master (bookkeeping files).

        Synchronous: every rank then passes `checkpoint_barrier`. With `async_`, the master
        copies `obj` to CPU memory and returns while a background thread writes it; nobody
        waits here. The write is waited for (and every rank passes the barrier) by
        `wait_for_checkpoint`, which the next save and `load_checkpoint` call first, and the
        caller calls at the end of the run. Collective: every rank calls it.

        Returns:
            the background write's future on the master with `async_` (``done()`` tells
            whether it finished; `wait_for_checkpoint` is still the way to finish it), else None.
        """
        self.wait_for_checkpoint()
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        if not async_:
            if self.is_master and paths:
                ckpt_io.save_targets(obj, paths)
                if on_written is not None:
                    on_written()
            self.checkpoint_barrier()
            return None
        future = None
        if self.is_master and paths:
            future = self.checkpoint_writer.save(obj, paths, on_written)
        self._checkpoint_pending = True  # on every rank: all of them pass the barrier later
        return future

    @property
    def checkpoint_writer(self) -> AsyncCheckpointWriter:
        """This process's background checkpoint writer (a sharded engine hands it the futures
        of its own asynchronous writes, see `AsyncCheckpointWriter.track`, and sets
        ``_checkpoint_pending``)."""
        if self._checkpoint_writer is None:
            self._checkpoint_writer = AsyncCheckpointWriter()
        return self._checkpoint_writer

    @property
    def checkpoint_pending(self) -> bool:
        """Whether an asynchronous save was started and not waited for."""
        return self._checkpoint_pending

    def wait_for_checkpoint(self, collective: bool = True) -> None:
        """Finish the pending asynchronous save, if any: the writer's error is raised here (on
        the master, before the barrier, as a synchronous save raises); then every rank passes
        `checkpoint_barrier`, so no rank reads a file before it is complete, and a
        `finalize` given to `AsyncCheckpointWriter.track` runs (after the barrier).

        Args:
            collective: False on failure paths (an exception, ranks maybe gone): this process
                only joins its own write, no barrier and no `finalize`, so the checkpoint is
                either complete or (folders) left without a manifest, hence never trusted.
        """
        if not self.checkpoint_pending:
            return
        self._checkpoint_pending = False
        finalize = self.checkpoint_writer.wait()
        if collective:
            self.checkpoint_barrier()
            if finalize is not None:
                finalize()

    def choose_checkpoint(
        self, candidates: Sequence[str | Path], require_manifest: bool = False
    ) -> tuple[Path | None, list[str]]:
        """The newest intact checkpoint of `candidates` and what was skipped as damaged
        (`ddprun.checkpoint_manifest.newest_intact`), decided on the master (which reads
        every byte once) and the same on every rank. Collective."""
        chosen, skipped = (None, [])
        if self.is_master:
            chosen, skipped = newest_intact(candidates, require_manifest=require_manifest)
        chosen, skipped = self.broadcast_object((chosen, skipped))
        return (Path(chosen) if chosen is not None else None), list(skipped)

    def checkpoint_barrier(self) -> None:
        """Wait for the master's checkpoint write (DDP: on a group with its own, longer
        timeout, so a slow filesystem never trips the training collective timeout)."""
        self.barrier()

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Read a checkpoint (every rank reads the same file; a sharded folder is read whole),
        after the pending asynchronous save (`wait_for_checkpoint`: collective while a save
        is pending)."""
        self.wait_for_checkpoint()
        return ckpt_io.load_checkpoint(path)

    def checkpoint_path(self, folder: str | Path, name: str) -> Path:
        """Where checkpoint `name` ("best", "last", "<stage>.<epoch>") lives: one file,
        ``<folder>/<name>.pth``; the FSDP engine writes a folder ``<folder>/<name>``."""
        return Path(folder) / f"{name}.pth"

    def remove_checkpoint(self, path: str | Path) -> None:
        """Delete a checkpoint written by `save_checkpoint` (called on the master only)."""
        Path(path).unlink(missing_ok=True)


def average_local_gradients(engine: IEngine, models: Sequence[Any]) -> None:
    """Average rank-local gradients across ranks (divide by the world size, then one sum
    all-reduce per dtype); a parameter without a gradient on every rank keeps none."""
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for model in models:
        for param in model.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                groups.setdefault(param.dtype, []).append(param)
    for dtype, params in groups.items():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=dtype)
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(engine.world_size)
        flat = engine.all_reduce(torch.cat([flat, has.to(flat.device)]), "sum")
        present = flat[-len(params) :].tolist()  # once per loader end, not per batch
        values = flat[: -len(params)].split([p.numel() for p in params])
        for param, value, count in zip(params, values, present):
            param.grad = value.view_as(param).clone() if count else None
