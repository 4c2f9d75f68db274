"""Checkpoint averaging (``ddprun.utils.average_weights``, ``get_averaged_weights_by_path_mask``):
the element-wise mean of model state dicts, read from files or given.
"""

from __future__ import annotations

import glob
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ddprun.checkpoint import CheckpointError, load_checkpoint

__all__ = ["average_weights", "get_averaged_weights_by_path_mask"]


def _average_tensors(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise CheckpointError(f"average_weights: {key!r} has different shapes {sorted(shapes)}")
    first = tensors[0]
    if first.dtype == torch.bool:  # a mask: majority vote
        votes = torch.stack([t.to(torch.float64) for t in tensors]).mean(0)
        return votes >= 0.5
    wide = torch.complex128 if first.is_complex() else torch.float64
    mean = torch.stack([t.to(wide) for t in tensors]).mean(0)
    if not (first.is_floating_point() or first.is_complex()):
        mean = mean.round()  # integer counters (num_batches_tracked) stay integers
    return mean.to(first.dtype)


def _average(key: str, values: list[Any], sources: Sequence[str]) -> Any:
    if all(isinstance(v, Mapping) for v in values):
        keys = list(values[0])
        for value, source in zip(values[1:], sources[1:]):
            if set(value) != set(keys):
                missing, extra = sorted(set(keys) - set(value)), sorted(set(value) - set(keys))
                where = f" under {key!r}" if key else ""
                raise CheckpointError(
                    f"average_weights: {source} does not have the keys of {sources[0]}{where} "
                    f"(missing {missing}, extra {extra})"
                )
        prefix = f"{key}." if key else ""
        return OrderedDict(
            (k, _average(f"{prefix}{k}", [v[k] for v in values], sources)) for k in keys
        )
    if all(isinstance(v, torch.Tensor) for v in values):
        return _average_tensors(key, list(values))
    if any(isinstance(v, (torch.Tensor, Mapping)) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise CheckpointError(f"average_weights: {key!r} holds different kinds of values {kinds}")
    return values[0]  # non-tensor extra state: kept from the first


def average_weights(state_dicts: Sequence[Mapping[str, Any]]) -> OrderedDict:
    """The element-wise mean of model state dicts (stochastic weight averaging of checkpoints).

    Floating-point tensors are averaged in float64 and returned in their own dtype; integer
    tensors (e.g. BatchNorm's ``num_batches_tracked``) are averaged and rounded, boolean ones
    by majority. A dict of state dicts (the state of a dict of models) is averaged key by key.

    Raises:
        ValueError: for an empty list.
        CheckpointError: when the state dicts have different keys or shapes.
    """
    if not state_dicts:
        raise ValueError("average_weights needs at least one state dict, got none")
    sources = [f"state dict {i}" for i in range(len(state_dicts))]
    return _average("", list(state_dicts), sources)


def _model_state(path: str) -> Mapping[str, Any]:
    checkpoint = load_checkpoint(path)
    if "model_state_dict" not in checkpoint:
        return checkpoint  # a bare state dict: torch.save(model.state_dict(), path)
    state = checkpoint["model_state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds no model state (model_state_dict is {state!r})")
    return state


def _no_match_message(pattern: str, path_mask: str, logdir: Any) -> str:
    message = f"get_averaged_weights_by_path_mask: no file matches {pattern!r}"
    if logdir is None:
        folder, name = os.path.split(path_mask)
        nested = os.path.join(folder or ".", "checkpoints", name)
        if glob.glob(nested):
            message += (
                f"; a run's checkpoints are in <logdir>/checkpoints: pass "
                f"path_mask={nested!r}, or logdir={folder or '.'!r} with path_mask={name!r}"
            )
    return message


def get_averaged_weights_by_path_mask(
    path_mask: str, logdir: str | os.PathLike[str] | None = None
) -> OrderedDict:
    """The averaged model weights of every checkpoint matching a glob pattern.

    Args:
        path_mask: a glob pattern such as ``"logs/checkpoints/train.*.pth"``.
        logdir: a run folder: the pattern is then matched in ``<logdir>/checkpoints``.

    Each file is a ddprun checkpoint (its ``model_state_dict``, a dict of state dicts for a
    dict of models) or a bare state dict. Files are read in sorted order. A run folder holds
    ``best.pth`` and ``last.pth`` besides the per-epoch files, which are usually the same
    epochs again: pick the mask accordingly (``"train.*.pth"`` for the epochs only).

    Raises:
        FileNotFoundError: when nothing matches (with a hint when the files are one folder down).
        CheckpointError: when the checkpoints do not hold the same keys and shapes.
    """
    if logdir is None:
        pattern = os.fspath(path_mask)
    else:
        pattern = os.path.join(os.fspath(logdir), "checkpoints", path_mask)
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(_no_match_message(pattern, path_mask, logdir))
    return _average("", [_model_state(path) for path in paths], paths)
