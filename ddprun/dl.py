"""The public facade: ``from ddprun import dl`` gives runners, callbacks, engines and loggers."""

from ddprun.callbacks import (
    AccuracyCallback,
    CheckpointCallback,
    ConfusionMatrixCallback,
    CriterionCallback,
    EarlyStoppingCallback,
    OptimizerCallback,
    PrecisionRecallF1SupportCallback,
    SchedulerCallback,
    TimerCallback,
    TqdmCallback,
)
from ddprun.core.callback import Callback, CallbackNode, CallbackOrder, Event
from ddprun.core.runner import IRunner, RunnerError
from ddprun.core.runner_train import Runner
from ddprun.engines import (
    AMPEngine,
    DataParallelEngine,
    DeviceEngine,
    DistributedDataParallelAMPEngine,
    DistributedDataParallelEngine,
    IEngine,
)
from ddprun.loggers import ConsoleLogger, CSVLogger, ILogger, TensorboardLogger

__all__ = [
    "AMPEngine",
    "AccuracyCallback",
    "CSVLogger",
    "Callback",
    "CallbackNode",
    "CallbackOrder",
    "CheckpointCallback",
    "ConfusionMatrixCallback",
    "ConsoleLogger",
    "CriterionCallback",
    "DataParallelEngine",
    "DeviceEngine",
    "DistributedDataParallelAMPEngine",
    "DistributedDataParallelEngine",
    "EarlyStoppingCallback",
    "Event",
    "IEngine",
    "ILogger",
    "IRunner",
    "OptimizerCallback",
    "PrecisionRecallF1SupportCallback",
    "Runner",
    "RunnerError",
    "SchedulerCallback",
    "TensorboardLogger",
    "TimerCallback",
    "TqdmCallback",
]
