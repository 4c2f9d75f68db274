"""The logger interface: what the runner tells loggers, and the value conversion they share.

Loggers run on rank 0 only; the runner guarantees that, so no logger touches ``torch.distributed``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["ILogger", "Scope", "format_value", "scalar_metrics", "to_float"]

Scope = Literal["batch", "loader", "epoch"]


class ILogger:
    """Receives metrics, images and hyper-parameters from the runner; every method is a no-op.

    The ``runner`` argument exposes ``stage_key``, ``stage_epoch_step``, ``stage_epoch_len``,
    ``global_epoch_step``, ``global_batch_step``, ``global_sample_step``, ``loader_key``,
    ``loader_batch_step`` and ``loader_batch_len``.
    """

    def log_metrics(self, metrics: Mapping[str, Any], scope: Scope, runner: IRunner) -> None:
        """Logs metrics.

        Args:
            metrics: for ``"batch"`` and ``"loader"`` scope ``{name: float | Tensor}``; for
                ``"epoch"`` scope ``{loader_key: {name: float}}``, possibly with an ``"_epoch_"``
                key for epoch-level values such as ``lr``.
            scope: ``"batch"``, ``"loader"`` or ``"epoch"``.
            runner: the runner, for its counters and keys.
        """

    def log_image(self, tag: str, image: Any, scope: Scope, runner: IRunner) -> None:
        """Logs an image (HxWxC uint8 numpy array or CxHxW tensor)."""

    def log_hparams(self, hparams: Mapping[str, Any], runner: IRunner) -> None:
        """Logs the experiment's hyper-parameters."""

    def flush_log(self) -> None:
        """Pushes buffered output to its destination."""

    def close_log(self) -> None:
        """Flushes and releases files or writers; logging again may reopen them."""


def to_float(value: Any) -> float:
    """Returns ``value`` (number, numpy scalar, one-element tensor or array) as a float.

    Raises:
        TypeError: for anything with more than one element or not numeric.
    """
    if isinstance(value, torch.Tensor | np.ndarray):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if count != 1:
            raise TypeError(f"expected a scalar, got an array of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, int | float | np.number | bool):
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Returns the metrics that are scalars, as floats; others are skipped with a warning.

    Logging must never end a run, so a stray non-scalar value (a matrix, a string) is reported
    and left out instead of raising.
    """
    result = {}
    for name, value in metrics.items():
        try:
            result[name] = to_float(value)
        except TypeError as error:
            warnings.warn(f"logger skips metric {name!r}: {error}", stacklevel=3)
    return result


def format_value(value: float) -> str:
    """Returns a short readable number: integers as such, others with 4 significant digits."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"
