"""SchedulerCallback: step learning-rate schedulers per batch or per epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ddprun.callbacks._access import entries, epoch_metric, loader_skipped, select
from ddprun.callbacks.control import unwrap_callback
from ddprun.callbacks.optimizer import OptimizerCallback
from ddprun.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

try:
    from torch.optim.lr_scheduler import ReduceLROnPlateau
except ImportError:  # pragma: no cover
    ReduceLROnPlateau = ()  # type: ignore[assignment]


class SchedulerCallback(Callback):
    """Step the scheduler(s) and report the learning rate as ``lr`` (or ``lr/<key>``).

    Args:
        scheduler_key: with a dict of schedulers, the one to step (default: all).
        mode: "epoch" (default; in ``on_epoch_end``) or "batch" (once per optimizer step).
        loader_key, metric_key: the epoch metric handed to ``ReduceLROnPlateau.step``.

    Batch mode steps a scheduler once per step of its optimizer: when an OptimizerCallback
    steps that optimizer, after each batch (or loader end) on which its `step_count` grew, so
    with ``accumulation_steps=k`` a loader of n batches steps ceil(n / k) times; when no
    OptimizerCallback steps it (``handle_batch`` does), after every training batch. Reading
    that counter is a Python int comparison: no collective, no host sync.

    The learning rate goes into ``batch_metrics`` (batch mode, every training batch) and into
    the training loaders' ``loader_metrics``; after an epoch-mode step, the new rate into
    ``epoch_metrics["_epoch_"]``.
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
        # batch mode: per scheduler, the OptimizerCallback stepping its optimizer (None: none
        # does, step every batch) and that callback's step count when this one last stepped
        self._owners: dict[str | None, OptimizerCallback | None] = {}
        self._seen: dict[str | None, int] = {}

    def on_stage_start(self, runner: IRunner) -> None:
        scheduler = select(runner.scheduler, self.scheduler_key, "scheduler", "SchedulerCallback")
        self._schedulers = entries(scheduler)
        if self.scheduler_key is not None:
            self._schedulers = {self.scheduler_key: scheduler}
        plateau = any(isinstance(s, ReduceLROnPlateau) for s in self._schedulers.values())
        if plateau and (self.loader_key is None or self.mode == "batch"):
            raise ValueError(
                "ReduceLROnPlateau needs SchedulerCallback(mode='epoch', loader_key=..., metric_key=...)"
            )
        if plateau and self.loader_key not in runner.loaders:
            raise ValueError(
                f"SchedulerCallback: loader_key={self.loader_key!r}, whose metric "
                f"ReduceLROnPlateau follows, is not a loader of stage {runner.stage_key!r}; "
                f"have {list(runner.loaders)}"
            )
        stepping = [
            inner
            for inner in map(unwrap_callback, runner.callbacks.values())
            if isinstance(inner, OptimizerCallback)
        ]
        self._owners = {
            key: _owner(stepping, getattr(scheduler, "optimizer", None), runner)
            for key, scheduler in self._schedulers.items()
        }
        self._seen = {key: o.step_count if o else 0 for key, o in self._owners.items()}

    def _learning_rates(self) -> dict[str, float]:
        rates = {}
        for key, scheduler in self._schedulers.items():
            optimizer = scheduler.optimizer
            rates["lr" if key is None else f"lr/{key}"] = float(optimizer.param_groups[0]["lr"])
        return rates

    def on_batch_end(self, runner: IRunner) -> None:
        if self.mode != "batch" or not runner.is_train_loader:
            return
        self._step_with_optimizers(every_batch=True)
        runner.batch_metrics.update(self._learning_rates())

    def on_loader_end(self, runner: IRunner) -> None:
        if not runner.is_train_loader:
            return
        if self.mode == "batch":  # OptimizerCallback steps a window left open at loader end
            self._step_with_optimizers(every_batch=False)
        runner.loader_metrics.update(self._learning_rates())

    def _step_with_optimizers(self, every_batch: bool) -> None:
        for key, scheduler in self._schedulers.items():
            owner = self._owners.get(key)
            if owner is None:
                if every_batch:
                    scheduler.step()
                continue
            for _ in range(owner.step_count - self._seen[key]):
                scheduler.step()
            self._seen[key] = owner.step_count

    def on_epoch_end(self, runner: IRunner) -> None:
        if self.mode != "epoch":
            return
        for scheduler in self._schedulers.values():
            if isinstance(scheduler, ReduceLROnPlateau):
                if loader_skipped(runner, self.loader_key):
                    continue  # no new value this epoch (PeriodicLoaderCallback): not counted
                value = epoch_metric(runner, self.loader_key, self.metric_key, "SchedulerCallback")
                scheduler.step(value)
            else:
                scheduler.step()
        runner.epoch_metrics.setdefault("_epoch_", {}).update(self._learning_rates())


def _owner(
    callbacks: list[OptimizerCallback], optimizer: Any, runner: IRunner
) -> OptimizerCallback | None:
    """The OptimizerCallback stepping `optimizer`, if any (the first, should several)."""
    for callback in callbacks:
        if any(candidate is optimizer for candidate in callback.optimizers_of(runner)):
            return callback
    return None
