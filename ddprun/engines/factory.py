"""Which engine a run gets when it names none, the one-process engine the core builds itself
(inference in one process), and whether a named engine fits the launch.

The engine follows the launch: a process started by a launcher (ddprun, torchrun, a SLURM
script running either) with ``WORLD_SIZE > 1`` runs the DDP engine (its AMP variant with
``amp=True``); a plain process keeps the single-process default (`DeviceEngine`, CUDA when
available, or `AMPEngine`). A single-process engine named explicitly under such a launch is an
error on every rank before anything runs or is written: N copies of a one-process run would
train apart and overwrite each other's logdir.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ddprun import distributed

if TYPE_CHECKING:
    import torch


class EngineMismatchError(RuntimeError):
    """A single-process engine was asked for in a process launched as one rank of several.

    Every rank raises it alike, so the launcher reports it once, from rank 0.
    """

    raised_on_every_rank = True


def launched_world_size() -> int:
    """WORLD_SIZE of a launcher-started process (1 for a plain process)."""
    if not distributed.is_launched():
        return 1
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        return 1


def default_engine(amp: bool = False, ddp: bool = False, fsdp: bool = False) -> Any:
    """The engine of a run that names none: FSDP when asked (bf16/fp16 parameters with `amp`:
    fp16 on CUDA, bf16 on CPU); DDP when asked or when launched with ``WORLD_SIZE > 1``, else
    one process; the AMP variant with `amp`."""
    from ddprun import engines

    if fsdp:
        import torch

        dtype = ("fp16" if torch.cuda.is_available() else "bf16") if amp else None
        return engines.FSDPEngine(param_dtype=dtype)
    if ddp or launched_world_size() > 1:
        if amp:
            return engines.DistributedDataParallelAMPEngine()
        return engines.DistributedDataParallelEngine()
    return engines.AMPEngine() if amp else engines.DeviceEngine()


def single_process_engine(
    device: str | torch.device | None = None, amp: bool = False, dtype: Any = None
) -> Any:
    """A one-process engine on `device` (default: CUDA when available): `AMPEngine` with
    `amp` (`dtype` as it takes, None: the device's default), else `DeviceEngine`."""
    from ddprun import engines

    if amp:
        return engines.AMPEngine(device, dtype=dtype)
    return engines.DeviceEngine(device)


def check_engine_fits_launch(engine: Any) -> None:
    """Refuse a single-process engine in a process that is one rank of a launched group.

    Raises:
        EngineMismatchError: naming the engine, the rank and world size, and the fix.
    """
    world_size = launched_world_size()
    if world_size <= 1 or getattr(engine, "world_size", 1) > 1 or _is_distributed(engine):
        return
    rank = os.environ.get("RANK", "?")
    raise EngineMismatchError(
        f"{type(engine).__name__} runs one process, but this process is rank {rank} of "
        f"WORLD_SIZE={world_size} started by a launcher: each rank would train alone and "
        "write the same files. Use dl.DistributedDataParallelEngine() "
        "(dl.DistributedDataParallelAMPEngine() for AMP), or name no engine: under a launcher "
        "the DDP engine is chosen."
    )


def _is_distributed(engine: Any) -> bool:
    return bool(getattr(engine, "is_ddp", False) or getattr(engine, "is_distributed", False))
