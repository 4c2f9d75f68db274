"""The callbacks and loggers the core adds when the user names none, looked up by role.

`core/` knows callbacks and loggers through their base classes; where it must add one itself
(``train()``'s checkpoint or progress bar, the console logger of every run, ...) it asks this
table by role, so the concrete classes are named in one place and the core never imports
``ddprun.callbacks`` or ``ddprun.loggers``. Engines come from ``ddprun.engines.factory``.
The plug-in packages are imported on the first lookup, not when the core is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ddprun.core.callback import Callback
    from ddprun.loggers.base import ILogger

__all__ = [
    "CallbackRole",
    "LoggerRole",
    "callback_class",
    "console_loggers",
    "has_callback",
    "logger_class",
    "with_logdir_loggers",
]

CallbackRole = Literal[
    "criterion", "optimizer", "scheduler", "checkpoint", "progress", "timer", "check", "overfit"
]
LoggerRole = Literal["console", "csv", "tensorboard"]

#: role -> "module:Class"; strings, so that looking one up imports only its package
_CALLBACKS: dict[str, str] = {
    "criterion": "ddprun.callbacks:CriterionCallback",
    "optimizer": "ddprun.callbacks:OptimizerCallback",
    "scheduler": "ddprun.callbacks:SchedulerCallback",
    "checkpoint": "ddprun.callbacks:CheckpointCallback",
    "progress": "ddprun.callbacks:TqdmCallback",
    "timer": "ddprun.callbacks:TimerCallback",
    "check": "ddprun.callbacks:CheckRunCallback",
    "overfit": "ddprun.callbacks:BatchOverfitCallback",
}
_LOGGERS: dict[str, str] = {
    "console": "ddprun.loggers:ConsoleLogger",
    "csv": "ddprun.loggers:CSVLogger",
    "tensorboard": "ddprun.loggers:TensorboardLogger",
}


def _load(table: Mapping[str, str], role: str, what: str) -> Any:
    if role not in table:
        raise KeyError(f"no default {what} for role {role!r}; roles: {sorted(table)}")
    module, name = table[role].split(":")
    return getattr(importlib.import_module(module), name)


def callback_class(role: CallbackRole) -> type[Callback]:
    """The callback class that plays `role` (e.g. ``"checkpoint"`` -> CheckpointCallback)."""
    return _load(_CALLBACKS, role, "callback")


def logger_class(role: LoggerRole) -> type[ILogger]:
    """The logger class that plays `role` (``"console"``, ``"csv"``, ``"tensorboard"``)."""
    return _load(_LOGGERS, role, "logger")


def has_callback(callbacks: Mapping[str, Callback], role: CallbackRole) -> bool:
    """Whether a callback playing `role` is among `callbacks`, also inside a
    ControlFlowCallback (Catalyst's "is there one of this kind?" sees through wrappers)."""
    from ddprun.callbacks.control import unwrap_callback

    kind = callback_class(role)
    return any(isinstance(unwrap_callback(cb), kind) for cb in callbacks.values())


def console_loggers() -> dict[str, ILogger]:
    """The loggers of a run that names none: ``{"console": ConsoleLogger()}``."""
    return {"console": logger_class("console")()}


def with_logdir_loggers(loggers: Mapping[str, ILogger], logdir: Any) -> dict[str, ILogger]:
    """`loggers` plus a CSV and a TensorBoard logger writing to `logdir` (as ``"_csv"`` and
    ``"_tensorboard"``), each unless one of its kind is given; `loggers` alone without one."""
    result = dict(loggers)
    if logdir is None:
        return result
    for key, role in (("_csv", "csv"), ("_tensorboard", "tensorboard")):
        kind: Any = _load(_LOGGERS, role, "logger")
        if not any(isinstance(logger, kind) for logger in result.values()):
            result[key] = kind(logdir=logdir)
    return result
