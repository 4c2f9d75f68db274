"""Metrics: pure functions on tensors, stateful metrics with declared states, and their cross-rank sync.

Importing this package loads only torch.
"""

from ddprun.metrics.additive import AdditiveMetric, AdditiveValueMetric
from ddprun.metrics.auc import AUCMetric
from ddprun.metrics.classification import (
    AccuracyMetric,
    ConfusionMatrixMetric,
    MulticlassPrecisionRecallF1SupportMetric,
)
from ddprun.metrics.cmc import CMCMetric
from ddprun.metrics.functional import accuracy, confusion_matrix, precision_recall_fbeta_support
from ddprun.metrics.metric import Metric
from ddprun.metrics.multilabel import MultilabelAccuracyMetric
from ddprun.metrics.segmentation import DiceMetric, IOUMetric, TrevskyMetric
from ddprun.metrics.sync import Collectives, synchronized
from ddprun.metrics.torchmetrics_adapter import TorchMetric

__all__ = [
    "AUCMetric",
    "AccuracyMetric",
    "AdditiveMetric",
    "AdditiveValueMetric",
    "CMCMetric",
    "Collectives",
    "ConfusionMatrixMetric",
    "DiceMetric",
    "IOUMetric",
    "Metric",
    "MulticlassPrecisionRecallF1SupportMetric",
    "MultilabelAccuracyMetric",
    "TorchMetric",
    "TrevskyMetric",
    "accuracy",
    "confusion_matrix",
    "precision_recall_fbeta_support",
    "synchronized",
]
