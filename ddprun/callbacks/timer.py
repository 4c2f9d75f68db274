"""TimerCallback: batch time, data time and samples per second into the batch metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ddprun.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


class TimerCallback(Callback):
    """``_timer/batch_time``, ``_timer/data_time`` (waiting for the loader) and ``_timer/_fps``.

    Host wall-clock times: on CUDA, kernels still running are not waited for (no sync).
    """

    def __init__(self) -> None:
        # after the optimizer and scheduler, so the batch time includes backward and step
        super().__init__(order=CallbackOrder.Scheduler + 1)
        self._batch_start = 0.0
        self._previous_end: float | None = None

    def on_loader_start(self, runner: IRunner) -> None:
        self._previous_end = time.perf_counter()

    def on_batch_start(self, runner: IRunner) -> None:
        self._batch_start = time.perf_counter()

    def on_batch_end(self, runner: IRunner) -> None:
        now = time.perf_counter()
        batch_time = max(now - self._batch_start, 1e-9)
        data_time = self._batch_start - (self._previous_end or self._batch_start)
        runner.batch_metrics["_timer/batch_time"] = batch_time
        runner.batch_metrics["_timer/data_time"] = data_time
        runner.batch_metrics["_timer/_fps"] = runner.batch_size / batch_time
        self._previous_end = now
