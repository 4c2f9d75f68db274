"""`TorchMetricsCallback`: any ``torchmetrics.Metric`` as a loader metric, synced by ddprun.

Catalyst 21.12 has no torchmetrics callback; this one follows its metric callbacks' shape
(input/target keys, ``log_on_batch``, prefix, suffix). The metric is wrapped in
`ddprun.metrics.TorchMetric`, so torchmetrics' own per-metric sync is off and its states join the
runner's one loader-end reduction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ddprun.callbacks._access import batch_value
from ddprun.callbacks.metric import _LoaderMetricCallback
from ddprun.metrics import Metric
from ddprun.metrics._support import affix
from ddprun.metrics.torchmetrics_adapter import TorchMetric

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["TorchMetricsCallback"]

Keys = str | Sequence[str] | Mapping[str, str]


class TorchMetricsCallback(_LoaderMetricCallback):
    """Updates a torchmetrics metric per batch and puts its loader value into ``loader_metrics``.

    Inputs: a key (or a list of keys) for `input_key` and `target_key` passes those batch values
    positionally, inputs first (``metric.update(batch[input_key], batch[target_key])``); a dict
    ``{batch_key: argument_name}`` passes them by keyword. Keys of the result as in
    `TorchMetric.compute_key_value` (a scalar is ``metric_key``).

    Args:
        metric: a ``torchmetrics.Metric`` (built with ``validate_args=False`` where it has it,
            to keep its input checks from syncing with the host every batch).
        input_key, target_key: see above.
        metric_key: the key of a scalar result (default: the class name in snake case).
        log_on_batch: also put each batch's value (the metric's ``forward``) into
            ``batch_metrics``; it costs an extra compute per batch, so it is off by default.
        prefix, suffix: put around the keys.

    Raises:
        ImportError: torchmetrics is not installed (``pip install 'ddprun[torchmetrics]'``).
        TypeError: `metric` is not a ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        metric: Any,
        input_key: Keys,
        target_key: Keys,
        metric_key: str | None = None,
        log_on_batch: bool = False,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(input_key, target_key)  # type: ignore[arg-type]
        self.metric = TorchMetric(metric, key=metric_key, prefix=prefix, suffix=suffix)
        self.log_on_batch = log_on_batch
        self.batch_key = affix(self.metric.key, prefix, suffix)

    def _make_metric(self) -> Metric:
        return self.metric

    def _batch_keys(self) -> list[str]:
        return [self.batch_key] if self.log_on_batch else []

    def _arguments(self, runner: IRunner) -> tuple[list[Any], dict[str, Any]]:
        owner = type(self).__name__
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for keys in (self.input_key, self.target_key):
            if isinstance(keys, Mapping):
                kwargs.update(
                    {name: _detach(batch_value(runner, k, owner)) for k, name in keys.items()}
                )
            else:
                names = [keys] if isinstance(keys, str) else list(keys)
                args.extend(_detach(batch_value(runner, k, owner)) for k in names)
        return args, kwargs

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        args, kwargs = self._arguments(runner)
        if not self.log_on_batch:
            self.metric.update(*args, **kwargs)
            return
        value = self.metric.forward(*args, **kwargs)
        if isinstance(value, Tensor) and value.dim() == 0:
            runner.batch_metrics[self.batch_key] = value


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value
