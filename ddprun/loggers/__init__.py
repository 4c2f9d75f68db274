"""Loggers: console, CSV and TensorBoard (imported lazily), all behind ``ILogger``."""

from ddprun.loggers.base import ILogger
from ddprun.loggers.console import ConsoleLogger
from ddprun.loggers.csv import CSVLogger
from ddprun.loggers.tensorboard import TensorboardLogger

__all__ = ["CSVLogger", "ConsoleLogger", "ILogger", "TensorboardLogger"]
