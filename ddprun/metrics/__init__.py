"""Metrics: pure functions on tensors, stateful metrics with declared states, and their cross-rank sync.

Importing this package loads only torch.
"""

from ddprun.metrics.additive import AdditiveMetric
from ddprun.metrics.classification import (
    AccuracyMetric,
    ConfusionMatrixMetric,
    MulticlassPrecisionRecallF1SupportMetric,
)
from ddprun.metrics.functional import accuracy, confusion_matrix, precision_recall_fbeta_support
from ddprun.metrics.metric import Metric
from ddprun.metrics.sync import Collectives, synchronized

__all__ = [
    "AccuracyMetric",
    "AdditiveMetric",
    "Collectives",
    "ConfusionMatrixMetric",
    "Metric",
    "MulticlassPrecisionRecallF1SupportMetric",
    "accuracy",
    "confusion_matrix",
    "precision_recall_fbeta_support",
    "synchronized",
]
