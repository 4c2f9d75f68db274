"""TensorboardLogger: scalars and images as TensorBoard event files, one writer per loader.

Layout: ``<logdir>/tensorboard/<loader_key>/`` (``use_logdir_postfix=False`` drops the
``tensorboard/``), so TensorBoard overlays ``train`` and ``valid`` curves of one metric. Tags:

- loader scope: ``<metric>`` at step ``global_epoch_step``;
- batch scope (only with ``log_batch_metrics``): ``<metric>/batch`` at step ``global_sample_step``,
  a separate tag because its steps count samples, not epochs;
- epoch scope: the ``"_epoch_"`` entry only (for example ``lr``), in the ``_epoch_`` writer; the
  loaders' values were already written at loader scope;
- images: ``<tag>`` at step ``global_epoch_step`` in the current loader's writer.

``torch.utils.tensorboard`` is imported on first use, so importing ddprun never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from typing_extensions import override

from ddprun.loggers.base import ILogger, Scope, scalar_metrics

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["TensorboardLogger"]

_EPOCH_KEY = "_epoch_"


def _image_layout(image: Any) -> tuple[np.ndarray | torch.Tensor, str]:
    """Returns the image and its ``dataformats`` for ``SummaryWriter.add_image``.

    numpy arrays are read as HxW or HxWxC, tensors as HxW or CxHxW (each library's convention).
    """
    if isinstance(image, np.ndarray):
        layouts = {2: "HW", 3: "HWC"}
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        layouts = {2: "HW", 3: "CHW"}
    else:
        raise TypeError(f"log_image expects a numpy array or a tensor, got {type(image).__name__}")
    if image.ndim not in layouts:
        raise TypeError(f"log_image expects a 2-D or 3-D image, got shape {tuple(image.shape)}")
    return image, layouts[image.ndim]


class TensorboardLogger(ILogger):
    """Writes metrics and images to ``<logdir>/tensorboard/<loader_key>/``.

    Args:
        logdir: the RUN's log directory (the one given to the checkpoint callback too).
        log_batch_metrics: also write every batch's metrics (``<metric>/batch``).
        use_logdir_postfix: write under ``<logdir>/tensorboard/`` (default), else in ``logdir``.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        log_batch_metrics: bool = False,
        use_logdir_postfix: bool = True,
    ) -> None:
        self.logdir = Path(logdir) / "tensorboard" if use_logdir_postfix else Path(logdir)
        self.log_batch_metrics = log_batch_metrics
        self._writers: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Writers hold files and threads: a copy sent to another process opens its own lazily.
        state = self.__dict__.copy()
        state["_writers"] = {}
        return state

    def _writer(self, key: str) -> Any:
        """Returns the SummaryWriter of ``key``, creating it (and importing tensorboard) once."""
        if key not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[key] = SummaryWriter(log_dir=str(self.logdir / key))
        return self._writers[key]

    @override
    def log_metrics(self, metrics: Mapping[str, Any], scope: Scope, runner: IRunner) -> None:
        if scope == "loader":
            self._add_scalars(
                runner.loader_key, scalar_metrics(metrics), "", runner.global_epoch_step
            )
        elif scope == "batch" and self.log_batch_metrics:
            values = scalar_metrics(metrics)
            self._add_scalars(runner.loader_key, values, "/batch", runner.global_sample_step)
        elif scope == "epoch" and metrics.get(_EPOCH_KEY):
            values = scalar_metrics(metrics[_EPOCH_KEY])
            self._add_scalars(_EPOCH_KEY, values, "", runner.global_epoch_step)

    def _add_scalars(self, key: str, values: Mapping[str, float], suffix: str, step: int) -> None:
        writer = self._writer(key)
        for name, value in values.items():
            writer.add_scalar(f"{name}{suffix}", value, global_step=int(step))

    @override
    def log_image(self, tag: str, image: Any, scope: Scope, runner: IRunner) -> None:
        image, dataformats = _image_layout(image)
        key = runner.loader_key or _EPOCH_KEY
        step = int(runner.global_epoch_step)
        self._writer(key).add_image(tag, image, global_step=step, dataformats=dataformats)

    @override
    def flush_log(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    @override
    def close_log(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
