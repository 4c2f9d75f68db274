"""SchedulerCallback: step learning-rate schedulers per batch or per epoch."""

from __future__ import annotations

from typing import Any

from ddprun.callbacks._access import entries, epoch_metric, select
from ddprun.core.callback import Callback, CallbackOrder

try:
    from torch.optim.lr_scheduler import ReduceLROnPlateau
except ImportError:  # pragma: no cover
    ReduceLROnPlateau = ()  # type: ignore[assignment]


class SchedulerCallback(Callback):
    """Step the scheduler(s) and report the learning rate as ``lr`` (or ``lr/<key>``).

    Args:
        scheduler_key: with a dict of schedulers, the one to step (default: all).
        mode: "epoch" (default; in ``on_epoch_end``) or "batch" (after every training batch).
        loader_key, metric_key: the epoch metric handed to ``ReduceLROnPlateau.step``.

    The learning rate goes into ``batch_metrics`` (batch mode) and into the training loaders'
    ``loader_metrics``; after an epoch-mode step, the new rate into ``epoch_metrics["_epoch_"]``.
    """

    def __init__(
        self,
        scheduler_key: str | None = None,
        mode: str | None = None,
        loader_key: str | None = None,
        metric_key: str | None = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Scheduler)
        mode = mode or "epoch"
        if mode not in ("epoch", "batch"):
            raise ValueError(f"SchedulerCallback mode must be 'epoch' or 'batch', got {mode!r}")
        if (loader_key is None) != (metric_key is None):
            raise ValueError("SchedulerCallback: give loader_key and metric_key together")
        self.scheduler_key, self.mode = scheduler_key, mode
        self.loader_key, self.metric_key = loader_key, metric_key
        self._schedulers: dict[str | None, Any] = {}

    def on_stage_start(self, runner: Any) -> None:
        scheduler = select(runner.scheduler, self.scheduler_key, "scheduler", "SchedulerCallback")
        self._schedulers = entries(scheduler)
        if self.scheduler_key is not None:
            self._schedulers = {self.scheduler_key: scheduler}
        plateau = any(isinstance(s, ReduceLROnPlateau) for s in self._schedulers.values())
        if plateau and (self.loader_key is None or self.mode == "batch"):
            raise ValueError(
                "ReduceLROnPlateau needs SchedulerCallback(mode='epoch', loader_key=..., metric_key=...)"
            )

    def _learning_rates(self) -> dict[str, float]:
        rates = {}
        for key, scheduler in self._schedulers.items():
            optimizer = scheduler.optimizer
            rates["lr" if key is None else f"lr/{key}"] = float(optimizer.param_groups[0]["lr"])
        return rates

    def on_batch_end(self, runner: Any) -> None:
        if self.mode != "batch" or not runner.is_train_loader:
            return
        for scheduler in self._schedulers.values():
            scheduler.step()
        runner.batch_metrics.update(self._learning_rates())

    def on_loader_end(self, runner: Any) -> None:
        if runner.is_train_loader:
            runner.loader_metrics.update(self._learning_rates())

    def on_epoch_end(self, runner: Any) -> None:
        if self.mode != "epoch":
            return
        for scheduler in self._schedulers.values():
            if isinstance(scheduler, ReduceLROnPlateau):
                value = epoch_metric(runner, self.loader_key, self.metric_key, "SchedulerCallback")
                scheduler.step(value)
            else:
                scheduler.step()
        runner.epoch_metrics.setdefault("_epoch_", {}).update(self._learning_rates())
