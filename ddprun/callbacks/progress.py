"""TqdmCallback: a progress bar per loader on rank 0, refreshed a few times a second."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ddprun.core.callback import Callback, CallbackNode, CallbackOrder

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


class TqdmCallback(Callback):
    """One bar per loader with the current batch metrics.

    Metric values are read from the device (a host sync) only when the postfix refreshes,
    at most every `refresh_seconds`, never per batch.
    """

    def __init__(self, refresh_seconds: float = 0.5) -> None:
        super().__init__(order=CallbackOrder.ExternalExtra, node=CallbackNode.master)
        self.refresh_seconds = refresh_seconds
        self._bar: Any = None
        self._last_refresh = 0.0

    def on_loader_start(self, runner: IRunner) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=runner.loader_batch_len,
            desc=f"{runner.stage_epoch_step}/{runner.stage_epoch_len} * Epoch ({runner.loader_key})",
            leave=True,
            dynamic_ncols=True,
        )
        self._last_refresh = 0.0

    def on_batch_end(self, runner: IRunner) -> None:
        self._bar.update(1)
        now = time.monotonic()
        if now - self._last_refresh >= self.refresh_seconds:
            self._last_refresh = now
            values = {k: f"{_scalar(v):.4g}" for k, v in runner.batch_metrics.items()}
            self._bar.set_postfix(values, refresh=True)

    def on_loader_end(self, runner: IRunner) -> None:
        self._close()

    def on_exception(self, runner: IRunner) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _scalar(value: Any) -> float:
    return float(value.detach()) if hasattr(value, "detach") else float(value)
