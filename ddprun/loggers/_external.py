"""What the loggers of external trackers (MLflow, W&B) share: images as HxWxC arrays, flat
hyper-parameters, the runner's outcome and a weak link to the runner."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


def image_hwc(image: Any) -> np.ndarray:
    """`image` as a numpy array, HxW or HxWxC: numpy arrays are taken as HxW(xC), tensors as
    HxW or CxHxW (each library's convention, as `TensorboardLogger` reads them)."""
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        if array.ndim == 3:
            array = np.transpose(array, (1, 2, 0))
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"log_image expects a numpy array or a tensor, got {type(image).__name__}")
    if array.ndim not in (2, 3):
        raise TypeError(f"log_image expects a 2-D or 3-D image, got shape {tuple(image.shape)}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return array


def flat_params(
    hparams: Mapping[str, Any], exclude: Iterable[str] = (), prefix: str = ""
) -> dict[str, Any]:
    """Nested dicts flattened to ``"outer/inner"`` keys; keys named in `exclude` (as a plain
    name at any level, or as a flattened path) are left out with everything under them."""
    excluded = set(exclude)
    result: dict[str, Any] = {}
    for key, value in hparams.items():
        path = f"{prefix}{key}"
        if str(key) in excluded or path in excluded:
            continue
        if isinstance(value, Mapping):
            result.update(flat_params(value, excluded, prefix=f"{path}/"))
        else:
            result[path] = value
    return result


def outcome(runner_ref: weakref.ref | None) -> str:
    """How the runner's experiment ended: ``"finished"``, ``"failed"`` or ``"killed"``
    (stopped by a signal or Ctrl-C, or an Optuna trial pruned)."""
    runner = runner_ref() if runner_ref is not None else None
    error = getattr(runner, "exception", None)
    if error is None:
        return "finished"
    if isinstance(error, (KeyboardInterrupt, SystemExit)) or type(error).__name__ == "TrialPruned":
        return "killed"
    return "failed"


def runner_ref(runner: IRunner) -> weakref.ref | None:
    """A weak reference to `runner` (None when it cannot be referenced weakly)."""
    try:
        return weakref.ref(runner)
    except TypeError:
        return None
