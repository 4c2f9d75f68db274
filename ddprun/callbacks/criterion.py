"""CriterionCallback: the loss from ``runner.batch`` into ``batch_metrics``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ddprun.callbacks._access import batch_value, select
from ddprun.core.callback import Callback, CallbackOrder
from ddprun.engines.precision import NO_AUTOCAST

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


class CriterionCallback(Callback):
    """Compute ``criterion(batch[input_key], batch[target_key])`` into ``batch_metrics[metric_key]``.

    Runs on train and evaluation loaders (not ``infer*``); the loader value is the
    sample-weighted mean, exact across ranks. The loss keeps its graph for OptimizerCallback.
    """

    def __init__(
        self,
        input_key: str,
        target_key: str,
        metric_key: str = "loss",
        criterion_key: str | None = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Metric)
        self.input_key, self.target_key = input_key, target_key
        self.metric_key, self.criterion_key = metric_key, criterion_key
        self._criterion: Any = None
        self._fp32 = False

    def on_stage_start(self, runner: IRunner) -> None:
        self._criterion = select(
            runner.criterion, self.criterion_key, "criterion", "CriterionCallback"
        )
        # fp32 (the engine's one shared no-op context): no call and no context per batch
        self._fp32 = runner.engine.autocast() is NO_AUTOCAST

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        batch, owner = runner.batch, "CriterionCallback"
        if type(batch) is dict and self.input_key in batch and self.target_key in batch:
            inputs, targets = batch[self.input_key], batch[self.target_key]
        else:  # raises the error that names what is missing
            inputs = batch_value(runner, self.input_key, owner)
            targets = batch_value(runner, self.target_key, owner)
        if self._fp32:
            runner.batch_metrics[self.metric_key] = self._criterion(inputs, targets)
            return
        with runner.engine.autocast():
            runner.batch_metrics[self.metric_key] = self._criterion(inputs, targets)
