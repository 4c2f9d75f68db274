"""What a runner subclass overrides, with the defaults: the stages, their length, the
components' factories (``get_*``) and `handle_batch`.

`IRunner` (``ddprun.core.runner``) runs the loop over what these return; a user's runner
overrides any of them, Catalyst-style ("key-value is all you need").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ddprun import defaults
from ddprun.core.callback import Callback
from ddprun.core.runner_hooks import RunnerHooks
from ddprun.engines.factory import default_engine


class RunnerSurface(RunnerHooks):
    """The overridable surface of a runner (the runner is a callback too: `RunnerHooks`)."""

    model: Any
    engine: Any

    @property
    def stages(self) -> list[str]:
        """Stage names, run in order."""
        raise NotImplementedError("define the `stages` property (a list of stage names)")

    @property
    def seed(self) -> int:
        """Base seed of the run."""
        return 42

    @property
    def hparams(self) -> dict[str, Any]:
        """Hyper-parameters handed to the loggers at experiment start."""
        return {}

    def get_stage_len(self, stage: str) -> int:
        """Number of epochs of `stage` (default 1)."""
        return 1

    def get_engine(self) -> Any:
        """The engine (default: the one given to the constructor, else the one the launch
        calls for: DDP under a launcher with WORLD_SIZE > 1, else DeviceEngine())."""
        if self.engine is not None:
            return self.engine
        return default_engine()

    def get_loggers(self) -> dict[str, Any]:
        """Loggers for the whole experiment (default: a console logger)."""
        return defaults.console_loggers()

    def get_loaders(self, stage: str) -> Mapping[str, Any]:
        """Loaders of `stage`, run in dict order."""
        raise NotImplementedError("define get_loaders(stage) returning a dict of DataLoaders")

    def get_model(self, stage: str) -> Any:
        """Model (or dict of models) of `stage`; default: the one given to the constructor."""
        return self.model

    def get_criterion(self, stage: str) -> Any:
        """Criterion (or dict) of `stage`; default none."""
        return None

    def get_optimizer(self, stage: str, model: Any) -> Any:
        """Optimizer (or dict) of `stage` for `model`; default none."""
        return None

    def get_scheduler(self, stage: str, optimizer: Any) -> Any:
        """Scheduler (or dict) of `stage` for `optimizer`; default none."""
        return None

    def get_callbacks(self, stage: str) -> Mapping[str, Callback]:
        """Callbacks of `stage` (a dict, or a list); default none."""
        return {}

    def handle_batch(self, batch: Any) -> None:
        """One step: fill `self.batch` (and `batch_metrics`). The older name `_handle_batch`
        is honoured when a subclass defines that instead."""
        if type(self)._handle_batch is not RunnerSurface._handle_batch:
            return self._handle_batch(batch)
        raise NotImplementedError(f"{type(self).__name__} must define handle_batch(self, batch)")

    def _handle_batch(self, batch: Any) -> None:
        raise NotImplementedError
