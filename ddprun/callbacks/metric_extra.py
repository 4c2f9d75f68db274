"""Catalyst 21.12's other metric callbacks: multilabel accuracy, AUC, IoU/Dice/Tversky and CMC.

Like the callbacks in ``ddprun.callbacks.metric`` each owns one metric from ``ddprun.metrics``,
resets and tracks it at loader start (so the runner syncs it with every other metric in the one
loader-end reduction), updates it per batch without a host sync, and writes its loader values
into ``loader_metrics``; infer loaders are skipped. Batch values (``log_on_batch``) go into
``batch_metrics`` as tensors and are not averaged by the runner: their loader values are the
exact ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ddprun.callbacks._access import batch_value
from ddprun.callbacks.metric import _LoaderMetricCallback
from ddprun.metrics import Metric
from ddprun.metrics.auc import AUCMetric
from ddprun.metrics.cmc import CMCMetric
from ddprun.metrics.multilabel import MultilabelAccuracyMetric
from ddprun.metrics.segmentation import (
    DiceMetric,
    IOUMetric,
    RegionBasedMetric,
    TrevskyMetric,
    forwarding_signature,
)

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = [
    "AUCCallback",
    "CMCScoreCallback",
    "DiceCallback",
    "IOUCallback",
    "MultilabelAccuracyCallback",
    "TrevskyCallback",
]


class MultilabelAccuracyCallback(_LoaderMetricCallback):
    """``accuracy``: the share of right 0/1 decisions over all (sample, class) pairs.

    Args:
        input_key: scores (B, C) in ``runner.batch``.
        target_key: 0/1 targets (B, C), or class indices (B,).
        threshold: a float or per-class (C,) tensor; ``output > threshold`` predicts 1.
        log_on_batch: also put each batch's value into ``batch_metrics``.
        prefix, suffix: the key becomes ``{prefix}accuracy{suffix}``.
    """

    def __init__(
        self,
        input_key: str,
        target_key: str,
        threshold: float | torch.Tensor = 0.5,
        log_on_batch: bool = True,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(input_key, target_key)
        self.threshold, self.log_on_batch = threshold, log_on_batch
        self.prefix, self.suffix = prefix, suffix

    def _make_metric(self) -> Metric:
        return MultilabelAccuracyMetric(self.threshold, prefix=self.prefix, suffix=self.suffix)

    def _batch_keys(self) -> list[str]:
        return [self.metric.key] if self.log_on_batch else []

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        value = self.metric.update(*self._inputs(runner))
        if self.log_on_batch:
            runner.batch_metrics[self.metric.key] = value


class AUCCallback(_LoaderMetricCallback):
    """ROC-AUC over the loader: ``auc`` (macro), ``auc/_micro``, ``auc/_macro``, ``auc/_weighted``
    and, with `compute_per_class_metrics`, ``auc/class_00`` ... (see `ddprun.metrics.AUCMetric`).

    The scores are kept for the whole loader and gathered once at its end (exact across ranks).

    Args:
        input_key: scores (B, C), or (B,) / (B, 1) for a binary model, in ``runner.batch``.
        target_key: class indices (B,), 0/1 targets (B, C), or binary 0/1 targets (B,).
        compute_per_class_metrics: also report each column's AUC.
        prefix, suffix: keys become ``{prefix}auc{suffix}/_micro`` ...
    """

    def __init__(
        self,
        input_key: str,
        target_key: str,
        compute_per_class_metrics: bool = False,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(input_key, target_key)
        self.compute_per_class_metrics = compute_per_class_metrics
        self.prefix, self.suffix = prefix, suffix

    def _make_metric(self) -> Metric:
        return AUCMetric(
            compute_per_class_metrics=self.compute_per_class_metrics,
            prefix=self.prefix,
            suffix=self.suffix,
        )


class _RegionCallback(_LoaderMetricCallback):
    """Shared wiring of the segmentation callbacks: each names its `metric_class`, which is built
    from the options below (plus any that a subclass adds to ``_options``)."""

    metric: RegionBasedMetric
    metric_class: type[RegionBasedMetric]

    def __init__(
        self,
        input_key: str,
        target_key: str,
        class_dim: int = 1,
        weights: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        threshold: float | None = None,
        log_on_batch: bool = True,
        compute_per_class_metrics: bool = False,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(input_key, target_key)
        self._options: dict[str, Any] = {
            "class_dim": class_dim,
            "weights": weights,
            "class_names": class_names,
            "threshold": threshold,
            "compute_per_class_metrics": compute_per_class_metrics,
            "prefix": prefix,
            "suffix": suffix,
        }
        self.log_on_batch = log_on_batch

    def _make_metric(self) -> Metric:
        return self.metric_class(**self._options)

    def _batch_keys(self) -> list[str]:
        return self.metric.batch_keys if self.log_on_batch else []

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        if self.log_on_batch:
            runner.batch_metrics.update(self.metric.update_key_value(*self._inputs(runner)))
        else:
            self.metric.update(*self._inputs(runner))


class IOUCallback(_RegionCallback):
    """IoU (Jaccard) of (N, K, ...) masks: loader keys ``iou``, ``iou/_micro``, ``iou/_macro``,
    ``iou/_weighted`` (with weights), ``iou/<class name>`` (with `compute_per_class_metrics`);
    per batch ``iou`` (and ``iou/_weighted``). See `ddprun.metrics.IOUMetric`.

    Args:
        input_key, target_key: outputs and 0/1 targets of the same shape (N, K, ...).
        class_dim: the class axis K.
        weights, class_names: per-class weights (for ``_weighted``) and key names; either one
            fixes the class count up front, which keeps the sync to the one all-reduce.
        threshold: binarise outputs with ``> threshold``; None (default) keeps them soft.
        log_on_batch, compute_per_class_metrics, prefix, suffix: as in Catalyst 21.12.
    """

    metric_class = IOUMetric


class DiceCallback(_RegionCallback):
    """Dice of (N, K, ...) masks: keys ``dice``, ``dice/_micro`` ... as `IOUCallback`'s."""

    metric_class = DiceMetric


class TrevskyCallback(_RegionCallback):
    """Tversky index tp / (tp + beta fp + alpha fn) of (N, K, ...) masks: keys ``trevsky`` ...
    as `IOUCallback`'s; `alpha` weighs false negatives, `beta` (default 1 - alpha) false
    positives.

    Raises:
        ValueError: for `beta` None and `alpha` outside (0, 1).
    """

    metric_class = TrevskyMetric

    @forwarding_signature(_RegionCallback.__init__, skip=3)
    def __init__(
        self,
        input_key: str,
        target_key: str,
        alpha: float,
        beta: float | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_key, target_key, *args, **kwargs)
        self._options.update(alpha=alpha, beta=beta)
        self._make_metric()  # checks alpha/beta now, not at the first loader


class CMCScoreCallback(_LoaderMetricCallback):
    """CMC@k of a loader that holds queries and gallery: keys ``cmc01``, ``cmc05`` ...

    Each batch brings embeddings, labels and an ``is_query`` flag per sample (e.g. from a
    query/gallery dataset); every rank's samples are gathered at loader end, so the values are
    exact under DDP (Catalyst 21.12 refused DDP here). See `ddprun.metrics.CMCMetric` for ties.

    Args:
        embeddings_key, labels_key, is_query_key: keys in ``runner.batch``.
        topk_args: the k values (default (1,)).
        prefix, suffix: keys become ``{prefix}cmc01{suffix}``.
    """

    def __init__(
        self,
        embeddings_key: str,
        labels_key: str,
        is_query_key: str,
        topk_args: Sequence[int] | None = None,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(embeddings_key, labels_key)
        self.is_query_key = is_query_key
        self.topk_args, self.prefix, self.suffix = topk_args, prefix, suffix
        self._make_metric()  # checks topk_args now

    def _make_metric(self) -> Metric:
        return CMCMetric(
            self.input_key,
            self.target_key,
            self.is_query_key,
            topk_args=self.topk_args,
            prefix=self.prefix,
            suffix=self.suffix,
        )

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        embeddings, labels = self._inputs(runner)
        is_query = batch_value(runner, self.is_query_key, type(self).__name__)
        self.metric.update(embeddings, labels, is_query)
