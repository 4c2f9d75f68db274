"""Built-in callbacks, one small module each."""

from ddprun.callbacks.checkpoint import CheckpointCallback
from ddprun.callbacks.criterion import CriterionCallback
from ddprun.callbacks.early_stop import EarlyStoppingCallback
from ddprun.callbacks.metric import (
    AccuracyCallback,
    ConfusionMatrixCallback,
    PrecisionRecallF1SupportCallback,
)
from ddprun.callbacks.optimizer import OptimizerCallback
from ddprun.callbacks.progress import TqdmCallback
from ddprun.callbacks.scheduler import SchedulerCallback
from ddprun.callbacks.timer import TimerCallback

__all__ = [
    "AccuracyCallback",
    "CheckpointCallback",
    "ConfusionMatrixCallback",
    "CriterionCallback",
    "EarlyStoppingCallback",
    "OptimizerCallback",
    "PrecisionRecallF1SupportCallback",
    "SchedulerCallback",
    "TimerCallback",
    "TqdmCallback",
]
