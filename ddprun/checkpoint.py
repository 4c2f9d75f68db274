"""Checkpoint I/O: pack and unpack component states, atomic save, verified load (files; sharded
folders are read through `ddprun.checkpoint_folders`).

Plain I/O only. Who writes (rank 0) and who waits (the barrier) is the engine's decision.
Every file written here carries its manifest (size and checksum, see
`ddprun.checkpoint_manifest`), computed while torch writes it.
Checkpoints hold Python and NumPy RNG states besides tensors, so loading uses
``torch.load(weights_only=False)``: load only files you trust.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddprun.atomic import atomic_copy, atomic_write, atomic_write_bytes
from ddprun.checkpoint_manifest import write_sealed

__all__ = [
    "CheckpointError",
    "pack_checkpoint",
    "unpack_checkpoint",
    "save_checkpoint",
    "save_targets",
    "save_json",
    "rng_state",
    "restore_rng_state",
    "load_checkpoint",
    "unwrap_module",
]

COMPONENTS = ("model", "criterion", "optimizer", "scheduler")


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, foreign, or does not fit the components."""


def unwrap_module(module: Any) -> Any:
    """The plain module inside DataParallel/DistributedDataParallel wrappers and torch.compile's
    ``OptimizedModule``, nested in any order (others unchanged), so state dict keys carry no
    ``module.`` or ``_orig_mod.`` prefix and load into a compiled or an uncompiled model."""
    # torch._dynamo is looked up, not imported: if it is not loaded, nothing is compiled
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif isinstance(module, compiled):
            module = module._orig_mod
        else:
            return module


def _state_of(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return {key: _state_of(value) for key, value in obj.items()}
    obj = unwrap_module(obj)
    return obj.state_dict() if hasattr(obj, "state_dict") else None


def pack_checkpoint(
    model: Any = None,
    criterion: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """A checkpoint dict: ``<component>_state_dict`` for each component, plus `extra`.

    Dict components give a dict of state dicts, key by key. Wrapped models are unwrapped,
    so keys never carry a ``module.`` prefix.
    """
    components = {"model": model, "criterion": criterion, "optimizer": optimizer}
    components["scheduler"] = scheduler
    checkpoint = {f"{name}_state_dict": _state_of(obj) for name, obj in components.items()}
    checkpoint.update(extra)
    return checkpoint


def _load_into(obj: Any, state: Any, name: str, source: str) -> None:
    if obj is None or state is None:
        return
    if isinstance(obj, Mapping):
        if not isinstance(state, Mapping) or set(obj) - set(state):
            have = sorted(state) if isinstance(state, Mapping) else "a single state dict"
            raise CheckpointError(
                f"{source}: {name} is a dict with keys {sorted(obj)}, "
                f"but the checkpoint holds {have}"
            )
        for key, value in obj.items():
            _load_into(value, state[key], f"{name}[{key!r}]", source)
        return
    target = unwrap_module(obj)
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{source}: the saved {name} state does not fit the {name} "
            f"({type(target).__name__}): {error}"
        ) from error


def unpack_checkpoint(
    checkpoint: Mapping[str, Any],
    model: Any = None,
    criterion: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    source: str = "checkpoint",
) -> None:
    """Load the states of `checkpoint` into the given components (dicts key by key).

    Raises:
        CheckpointError: naming `source` and the component when a state does not fit.
    """
    given = {"model": model, "criterion": criterion, "optimizer": optimizer}
    given["scheduler"] = scheduler
    for name, obj in given.items():
        if obj is None:
            continue
        key = f"{name}_state_dict"
        if key not in checkpoint:
            raise CheckpointError(f"{source} has no {key} (it holds {sorted(checkpoint)})")
        _load_into(obj, checkpoint[key], name, source)


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash at any point leaves either the old file or the new one, never a truncated one,
    and the temporary file is removed when the write fails. The file carries its manifest
    (checksummed while written; `ddprun.checkpoint_manifest.verify` checks it).
    """
    return atomic_write(path, lambda handle: write_sealed(handle, lambda s: torch.save(obj, s)))


def save_targets(obj: Any, paths: list[str | os.PathLike]) -> Path:
    """Serialise `obj` once to ``paths[0]`` (`save_checkpoint`); the other paths become hard
    links of it (or copies), each atomically, so every name carries the same manifest."""
    first = save_checkpoint(obj, paths[0])
    for target in paths[1:]:
        atomic_copy(first, target)
    return first


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON, atomically (same rules as `save_checkpoint`)."""
    data = json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False).encode()
    return atomic_write_bytes(path, data)


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON for every reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states, for checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state()}
    state["torch"] = torch.get_rng_state()
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return state


def restore_rng_state(state: dict[str, Any] | None) -> None:
    """Restore what `rng_state()` captured (CUDA only when the device count matches)."""
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, with a clear error for a missing, truncated or foreign file.

    The file is memory-mapped (``torch.load(mmap=True)``): tensors are read from the page cache
    as they are used, so N ranks loading one checkpoint do not each hold a private copy of it in
    RAM. Files in torch's legacy (non-zip) format are read whole.

    A sharded checkpoint folder (written by the FSDP engine) is read whole, in this process and
    without a process group, as the same full dict (`ddprun.checkpoint_folders.consolidate`).
    """
    path = Path(path)
    if path.is_dir():
        from ddprun import checkpoint_folders

        return checkpoint_folders.consolidate(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = _torch_load(path)
    except Exception as error:  # torch raises several types for a damaged file
        size = path.stat().st_size
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): the file is truncated or not a "
            f"torch checkpoint ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, expected a checkpoint dict"
        )
    return checkpoint


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # a legacy-format file cannot be mapped: read it whole
        return torch.load(path, map_location="cpu", weights_only=False)
