"""Metric callbacks: accuracy, precision/recall/F1/support and the confusion matrix.

Each keeps a stateful metric from ``ddprun.metrics``, resets it at loader start, registers it
with ``runner.track_metric`` (so the runner syncs all metrics of a loader in one reduction) and
updates it per batch with no host sync.

Binary models (one logit per sample, as trained with ``BCEWithLogitsLoss``): outputs of shape (B,)
or (B, 1) with 0/1 targets of shape (B,) or (B, 1), int or float, predict class 1 where the output
is > ``threshold``. The default 0.0 is right for logits; a model that outputs probabilities passes
``threshold=0.5``. Give the precision/recall/F1 and confusion-matrix callbacks ``num_classes=2``.
Shapes that fit neither this nor (B, C) scores raise a ValueError naming both shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ddprun.callbacks._access import batch_value
from ddprun.core.batch_metrics import BatchMetrics
from ddprun.core.callback import Callback, CallbackOrder
from ddprun.metrics import AccuracyMetric, ConfusionMatrixMetric, Metric
from ddprun.metrics import MulticlassPrecisionRecallF1SupportMetric as PRFMetric
from ddprun.metrics._support import affix, check_topk, default_topk_args
from ddprun.metrics.classification import batch_accuracies

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


class _LoaderMetricCallback(Callback):
    """Shared wiring: one metric per callback, reset and tracked at loader start."""

    def __init__(self, input_key: str, target_key: str) -> None:
        super().__init__(order=CallbackOrder.Metric)
        self.input_key, self.target_key = input_key, target_key
        self.metric: Metric | None = None

    def _make_metric(self) -> Metric:
        raise NotImplementedError

    def on_loader_start(self, runner: IRunner) -> None:
        if self.metric is None:
            self.metric = self._make_metric()
        self.metric.to(runner.device)
        self.metric.reset()
        runner.track_metric(self.metric, batch_keys=self._batch_keys())

    def _batch_keys(self) -> list[str]:
        """Keys this callback writes per batch and computes exactly per loader."""
        return []

    def _inputs(self, runner: IRunner) -> tuple[torch.Tensor, torch.Tensor]:
        batch = runner.batch
        if type(batch) is dict and self.input_key in batch and self.target_key in batch:
            return batch[self.input_key].detach(), batch[self.target_key]  # no call per key
        owner = type(self).__name__  # the errors that name what is missing
        outputs = batch_value(runner, self.input_key, owner)
        return outputs.detach(), batch_value(runner, self.target_key, owner)

    def on_batch_end(self, runner: IRunner) -> None:
        if not runner.is_infer_loader:
            self.metric.update(*self._inputs(runner))

    def on_loader_end(self, runner: IRunner) -> None:
        if not runner.is_infer_loader:
            runner.loader_metrics.update(self.metric.compute_key_value())


class AccuracyCallback(_LoaderMetricCallback):
    """``accuracy01``, ``accuracy03``, ... per batch (tensors) and exact per loader.

    Args:
        input_key: logits in ``runner.batch``: (B, C), or (B,) / (B, 1) for a binary model.
        target_key: integer labels (B,) / (B, 1), one-hot (B, C), or 0/1 binary targets.
        topk_args: the k values; None (the default) takes Catalyst 21.12's: (1,), plus 3 when
            `num_classes` > 3, plus 5 when > 5. Binary outputs allow only k=1.
        num_classes: only sets the default `topk_args`.
        log_on_batch: also put each batch's accuracies into ``batch_metrics``, computed when
            first read (by a logger, the progress bar or a callback): a batch whose values
            nothing reads costs no op for them. False: the keys are not there at all.
        prefix, suffix: keys become ``{prefix}accuracy01{suffix}``.
        threshold: binary outputs predict class 1 where > threshold (0.0 logits, 0.5 probabilities).
    """

    def __init__(
        self,
        input_key: str,
        target_key: str,
        topk_args: Sequence[int] | None = None,
        num_classes: int | None = None,
        log_on_batch: bool = True,
        prefix: str | None = None,
        suffix: str | None = None,
        threshold: float = 0.0,
    ) -> None:
        super().__init__(input_key, target_key)
        self.topk_args = check_topk(topk_args or default_topk_args(num_classes))
        self.log_on_batch = log_on_batch
        self.prefix, self.suffix = prefix, suffix
        self.keys = [affix(f"accuracy{k:02d}", prefix, suffix) for k in self.topk_args]
        self.threshold = float(threshold)

    def _make_metric(self) -> Metric:
        return AccuracyMetric(topk=self.topk_args, threshold=self.threshold)

    def _batch_keys(self) -> list[str]:
        return list(self.keys) if self.log_on_batch else []

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        batch = runner.batch
        if type(batch) is dict and self.input_key in batch and self.target_key in batch:
            # add_counts detaches what it does not only arg-max: no detach op per batch here
            outputs, targets = batch[self.input_key], batch[self.target_key]
        else:
            outputs, targets = self._inputs(runner)
        correct = self.metric.add_counts(outputs, targets)
        if not self.log_on_batch:  # no batch value to compute
            return
        metrics = runner.batch_metrics
        if type(metrics) is BatchMetrics:  # computed only if something reads them
            metrics.defer(self.keys, batch_accuracies, correct, targets.shape[0])
        else:  # a dict a runner put there itself
            metrics.update(zip(self.keys, batch_accuracies(correct, targets.shape[0])))

    def on_loader_end(self, runner: IRunner) -> None:
        if not runner.is_infer_loader:
            runner.loader_metrics.update(zip(self.keys, self.metric.compute()))


class PrecisionRecallF1SupportCallback(_LoaderMetricCallback):
    """Loader metrics ``precision/_micro`` ... ``f1/_weighted`` and per class
    ``precision/class_00`` ... ``support/class_NN``, exact across ranks (loader level only).

    For a binary model give ``num_classes=2``: ``*/class_01`` are the positive class's values
    (scikit-learn's ``average="binary"``); ``threshold`` as in ``AccuracyCallback``.
    """

    def __init__(
        self,
        input_key: str,
        target_key: str,
        num_classes: int,
        zero_division: float = 0,
        log_on_batch: bool = False,
        threshold: float = 0.0,
    ) -> None:
        super().__init__(input_key, target_key)
        self.num_classes, self.zero_division = int(num_classes), zero_division
        self.threshold = float(threshold)

    def _make_metric(self) -> Metric:
        return PRFMetric(
            num_classes=self.num_classes,
            zero_division=self.zero_division,
            threshold=self.threshold,
        )


class ConfusionMatrixCallback(_LoaderMetricCallback):
    """The loader's confusion matrix (rows: targets, columns: predictions), exact across ranks.

    Kept as ``.matrix`` (a CPU tensor) after each loader, logged as an image (tag
    ``<prefix>/<loader_key>``) to loggers that take images; not put in ``loader_metrics``.
    A binary model gives ``num_classes=2``; ``threshold`` as in ``AccuracyCallback``.
    """

    def __init__(
        self,
        input_key: str,
        target_key: str,
        num_classes: int,
        normalize: bool = False,
        prefix: str = "confusion_matrix",
        threshold: float = 0.0,
    ) -> None:
        super().__init__(input_key, target_key)
        self.num_classes, self.normalize, self.prefix = int(num_classes), normalize, prefix
        self.threshold = float(threshold)
        self.matrix: torch.Tensor | None = None

    def _make_metric(self) -> Metric:
        return ConfusionMatrixMetric(
            num_classes=self.num_classes, normalize=self.normalize, threshold=self.threshold
        )

    def on_loader_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        self.matrix = self.metric.compute().detach().cpu()
        runner.log_image(f"{self.prefix}/{runner.loader_key}", render_matrix(self.matrix))


def render_matrix(matrix: torch.Tensor, cell: int = 16) -> np.ndarray:
    """A heat map of `matrix` as an HxWx3 uint8 image (white = 0, dark blue = row maximum)."""
    values = matrix.double()
    row_max = values.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    shade = (values / row_max).numpy()
    image = np.empty(shade.shape + (3,), dtype=np.float64)
    image[..., 0] = 255 * (1 - shade)
    image[..., 1] = 255 * (1 - 0.8 * shade)
    image[..., 2] = 255 - 90 * shade
    image = np.repeat(np.repeat(image, cell, axis=0), cell, axis=1)
    return image.round().astype(np.uint8)
