"""EarlyStoppingCallback: end the stage when a loader metric stops improving."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddprun.callbacks._access import epoch_metric, loader_skipped
from ddprun.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


class EarlyStoppingCallback(Callback):
    """Set ``runner.need_early_stop`` after `patience` epochs without improvement.

    The metric is exact across ranks, so every rank stops at the same epoch. The epoch that
    triggers the stop is still checkpointed; the next stage (if any) runs as usual.
    """

    def __init__(
        self,
        patience: int,
        loader_key: str,
        metric_key: str,
        minimize: bool,
        min_delta: float = 1e-6,
    ) -> None:
        super().__init__(order=CallbackOrder.External)
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.loader_key, self.metric_key = int(patience), loader_key, metric_key
        self.minimize, self.min_delta = bool(minimize), float(min_delta)
        self.best: float | None = None
        self.wait = 0

    def on_stage_start(self, runner: IRunner) -> None:
        self.best, self.wait = None, 0

    def on_epoch_end(self, runner: IRunner) -> None:
        if loader_skipped(runner, self.loader_key):
            return  # the loader did not run this epoch (PeriodicLoaderCallback): not counted
        score = epoch_metric(runner, self.loader_key, self.metric_key, "EarlyStoppingCallback")
        if self.best is None or self._improved(score):
            self.best, self.wait = score, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            runner.need_early_stop = True

    def _improved(self, score: float) -> bool:
        gain = self.best - score if self.minimize else score - self.best
        return gain > self.min_delta
