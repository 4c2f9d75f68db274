"""Inference outside a training run (``Runner.predict_loader``, ``Runner.evaluate_loader``):
which engine computes, and predictions of a loader split across DDP ranks gathered on rank 0.

After ``train`` a DDP engine has no process group: the spawn-mode parent never joined one, and
under a launcher the engine left it at the end of the run. Inference that needs no collective
runs on `inference_engine`, a one-process engine on the same device with the same precision;
inference that splits a loader across ranks joins the group again (`join_group`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ddprun import distributed
from ddprun.checkpoint import unwrap_module
from ddprun.core.runner import RunnerError
from ddprun.data.samplers import UnpaddedDistributedSampler
from ddprun.engines.factory import single_process_engine
from ddprun.engines.precision import MixedPrecision
from ddprun.utils import any2device


def inference_engine(engine: Any) -> Any:
    """The one-process engine that runs `engine`'s inference in this process.

    Engines other than the DDP engines are returned as they are. For a DDP engine: an
    AMPEngine (DDP AMP: same dtype) or a DeviceEngine on this process's device: the rank's own
    device once the engine has joined a group (under a launcher), else the device rank 0 uses
    (the spawn-mode parent, which holds rank 0's weights: ``cuda:0`` with NCCL, else the CPU).
    It keeps the DDP engine's rank, so `is_master` still picks one process, and has a world
    size of 1, so nothing waits for other ranks.
    """
    if not getattr(engine, "is_ddp", False):
        return engine
    device = engine.device if engine.rank >= 0 else _planned_device(engine)
    precision = engine.precision
    if isinstance(precision, MixedPrecision):
        # the spawn-mode parent built its precision for the CUDA it saw, not for rank 0's device
        same_type = precision.device_type == device.type
        local = single_process_engine(
            device, amp=True, dtype=precision.dtype if same_type else None
        )
    else:
        local = single_process_engine(device)
    local.rank, local.local_rank = engine.rank, engine.local_rank
    if engine.rank < 0 and distributed.is_launched():  # launched, but the engine never set up
        local.rank, local.local_rank = int(os.environ["RANK"]), distributed.get_local_rank()
    return local


def _planned_device(engine: Any) -> torch.device:
    """The device `engine.setup` would choose here (LOCAL_RANK is unset in a spawn parent:
    rank 0's device)."""
    backend = engine.backend or distributed._default_backend()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", distributed.cuda_index(distributed.get_local_rank()))
    return torch.device("cpu")


def can_split(engine: Any) -> bool:
    """Whether `engine` can split a loader across ranks from here: a DDP engine with a live
    process group, or under a launcher (whose group it can join again)."""
    if not getattr(engine, "is_ddp", False):
        return False
    live = torch.distributed.is_available() and torch.distributed.is_initialized()
    return live or distributed.is_launched()


def join_group(engine: Any) -> bool:
    """Join (or join again) the process group; True when this call joined it, so the caller
    leaves it again. Inside a run (the group live, the engine set up) nothing changes."""
    live = torch.distributed.is_initialized()
    if live and engine.rank >= 0:
        return False
    engine.setup()
    return not live


def sync_from_rank0(engine: Any, model: Any) -> None:
    """Give every rank rank 0's model state (one broadcast, through the CPU), so a split
    loader is predicted by one model: after DDP training the ranks' BatchNorm running
    statistics differ by their last local update, and rank 0's are the ones DDP broadcasts
    before each forward and checkpoints keep."""
    modules = model if isinstance(model, Mapping) else {"": model}
    plain = {key: unwrap_module(module) for key, module in modules.items()}
    states = None
    if engine.rank == 0:
        states = {key: _cpu_state(module) for key, module in plain.items()}
    states = engine.broadcast_object(states, src=0)
    if engine.rank != 0:
        for key, module in plain.items():
            module.load_state_dict(states[key])


def _cpu_state(module: Any) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


def split_loader(engine: Any, loader: Any, seed: int) -> Any:
    """`loader` sharded the way the engine shards evaluation loaders: one contiguous block per
    rank, no padding, so rank-ordered blocks are the loader's order."""
    sharded = engine.prepare_loaders({"infer": loader}, seed)["infer"]
    sampler = getattr(sharded, "sampler", None)
    if (
        not isinstance(sampler, UnpaddedDistributedSampler)
        or sampler.num_replicas != engine.world_size
        or sampler.rank != engine.rank
    ):
        raise RunnerError(
            "predict_loader(gather=True) splits the loader into one contiguous block per rank, "
            f"but this loader cannot be split that way (sampler {type(sampler).__name__}, "
            f"batch_sampler {type(getattr(loader, 'batch_sampler', None)).__name__}); pass a "
            "DataLoader with batch_size= and a plain or custom sampler (no distributed "
            "sampler, no batch_sampler), or gather=False to predict the whole loader on "
            "every rank"
        )
    return sharded


def to_cpu(output: Any) -> Any:
    """A prediction's tensors copied to the CPU (asynchronously from a GPU: see
    `gather_in_order`), so predictions do not pile up in device memory."""
    return any2device(output, "cpu")


def gather_in_order(engine: Any, outputs: list[Any], device: torch.device) -> list[Any] | None:
    """Every rank's `outputs` on rank 0, rank after rank (the loader's order for contiguous
    blocks), in one gather; None on the other ranks."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the asynchronous copies of `to_cpu` have landed
    parts = engine.gather_object(outputs)
    return None if parts is None else [output for part in parts for output in part]
