"""Built-in callbacks, one small module each."""

from ddprun.callbacks.batch import BatchTransformCallback, MetricAggregationCallback
from ddprun.callbacks.checkpoint import CheckpointCallback
from ddprun.callbacks.control import CheckRunCallback, ControlFlowCallback
from ddprun.callbacks.criterion import CriterionCallback
from ddprun.callbacks.early_stop import EarlyStoppingCallback
from ddprun.callbacks.loaders import BatchOverfitCallback, PeriodicLoaderCallback
from ddprun.callbacks.metric import (
    AccuracyCallback,
    ConfusionMatrixCallback,
    PrecisionRecallF1SupportCallback,
)
from ddprun.callbacks.metric_extra import (
    AUCCallback,
    CMCScoreCallback,
    DiceCallback,
    IOUCallback,
    MultilabelAccuracyCallback,
    TrevskyCallback,
)
from ddprun.callbacks.optimizer import OptimizerCallback
from ddprun.callbacks.optuna import OptunaPruningCallback
from ddprun.callbacks.progress import TqdmCallback
from ddprun.callbacks.scheduler import SchedulerCallback
from ddprun.callbacks.timer import TimerCallback
from ddprun.callbacks.torchmetrics_callback import TorchMetricsCallback

__all__ = [
    "AUCCallback",
    "AccuracyCallback",
    "BatchOverfitCallback",
    "BatchTransformCallback",
    "CMCScoreCallback",
    "CheckRunCallback",
    "CheckpointCallback",
    "ConfusionMatrixCallback",
    "ControlFlowCallback",
    "CriterionCallback",
    "DiceCallback",
    "EarlyStoppingCallback",
    "IOUCallback",
    "MetricAggregationCallback",
    "MultilabelAccuracyCallback",
    "OptimizerCallback",
    "OptunaPruningCallback",
    "PeriodicLoaderCallback",
    "PrecisionRecallF1SupportCallback",
    "SchedulerCallback",
    "TimerCallback",
    "TorchMetricsCallback",
    "TqdmCallback",
    "TrevskyCallback",
]
