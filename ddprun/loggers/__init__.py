"""Loggers: console, CSV, TensorBoard, MLflow and W&B (the last three import their library
on first use), all behind ``ILogger``."""

from ddprun.loggers.base import ILogger
from ddprun.loggers.console import ConsoleLogger
from ddprun.loggers.csv import CSVLogger
from ddprun.loggers.mlflow import MLflowLogger
from ddprun.loggers.tensorboard import TensorboardLogger
from ddprun.loggers.wandb import WandbLogger

__all__ = [
    "CSVLogger",
    "ConsoleLogger",
    "ILogger",
    "MLflowLogger",
    "TensorboardLogger",
    "WandbLogger",
]
