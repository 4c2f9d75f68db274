"""User-facing helpers: seeding, requires_grad, device moves, rank queries, checkpoints."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ddprun import model_tools as _model_tools
from ddprun.checkpoint import load_checkpoint, pack_checkpoint, save_checkpoint, unpack_checkpoint
from ddprun.distributed import get_rank, get_world_size

# the model utilities are re-exported as they are listed in model_tools.__all__ (their one list)
from ddprun.model_tools import *  # noqa: F403
from ddprun.registry import load_config

__all__ = [
    "any2device",
    "get_rank",
    "get_world_size",
    "load_checkpoint",
    "load_config",
    "pack_checkpoint",
    "save_checkpoint",
    "set_global_seed",
    "set_requires_grad",
    "unpack_checkpoint",
]
__all__ += _model_tools.__all__


def set_global_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every accelerator device).

    With no accelerator only the CPU generator is seeded: ``torch.manual_seed`` would also
    queue a lazy CUDA seeding that records a stack trace on every call (about 0.1 ms, 1 ms the
    first time; the runner seeds at every epoch), for devices that are not there.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch.accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def epoch_seed(seed: int, epoch: int, engine: Any) -> int:
    """The seed of one rank's epoch: ``seed + epoch * world_size + rank``.

    Distinct for every (epoch, rank) pair of a run, so no rank replays another rank's random
    stream of another epoch (``seed + epoch + rank`` made rank 0 at epoch e+1 repeat rank 1
    at epoch e); in one process it is ``seed + epoch``, as before.
    """
    return seed + epoch * max(engine.world_size, 1) + max(engine.rank, 0)


def set_requires_grad(
    model: nn.Module | Mapping[str, nn.Module], requires_grad: bool | Mapping[str, bool]
) -> None:
    """Freeze or unfreeze parameters.

    Args:
        model: a module or a dict of modules (each handled in turn).
        requires_grad: a bool for every parameter, or a dict mapping parameter-name prefixes
            (as in ``named_parameters()``, matched by whole dotted components) to bools; the
            longest matching prefix wins and parameters matching no prefix are left as they are.
    """
    if isinstance(model, Mapping):
        for module in model.values():
            set_requires_grad(module, requires_grad)
        return
    if isinstance(requires_grad, bool):
        for param in model.parameters():
            param.requires_grad_(requires_grad)
        return
    names = [name for name, _ in model.named_parameters()]

    def matches(name: str, prefix: str) -> bool:
        # whole dotted components: "1" matches "1.weight", not "10.weight"
        prefix = prefix.rstrip(".")
        return name == prefix or name.startswith(prefix + ".")

    unknown = [p for p in requires_grad if not any(matches(n, p) for n in names)]
    if unknown:
        raise ValueError(f"set_requires_grad: no parameter starts with {unknown}; have {names}")
    prefixes = sorted(requires_grad, key=len, reverse=True)
    for name, param in model.named_parameters():
        match = next((p for p in prefixes if matches(name, p)), None)
        if match is not None:
            param.requires_grad_(bool(requires_grad[match]))


def any2device(value: Any, device: str | torch.device) -> Any:
    """Move tensors (and modules, numpy arrays) inside dicts, lists and tuples to `device`.

    Tuples stay tuples (named tuples keep their type); non-tensor leaves are returned as is.
    A tensor already on `device` is returned as it is, without a ``.to`` call (the common
    case of a CPU batch on a CPU run: this runs once per batch).
    """
    return _to_device(value, device if type(device) is torch.device else torch.device(device))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    kind = type(value)
    if kind is tuple or kind is list:  # plain containers first: no ABC isinstance check
        return kind([_to_device(v, device) for v in value])
    if kind is dict or isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)([_to_device(v, device) for v in value])
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(value).to(device)
    if isinstance(value, nn.Module):
        return value.to(device)
    return value
