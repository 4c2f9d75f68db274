"""WandbLogger: metrics, hyper-parameters and images of a run in Weights & Biases
(``ddprun[wandb]``).

Catalyst 21.12's arguments and metric names; unlike Catalyst, ``wandb.init`` is not called
when the logger is built but on its first use, which the runner makes on rank 0 only, at
experiment start. So a logger built in a script that every rank runs (``python -m ddprun
--nproc N``), or sent to spawned workers (Catalyst issue #1316), makes one W&B run.
``WANDB_MODE=offline`` (or ``mode="offline"``) writes the run under ``./wandb`` with no network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ddprun._optional import import_optional
from ddprun.loggers._external import image_hwc, outcome, runner_ref
from ddprun.loggers.base import ILogger, Scope, scalar_metrics

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["WandbLogger"]

_EPOCH_KEY = "_epoch_"


def _wandb() -> Any:
    return import_optional("wandb", "wandb", "WandbLogger")


class WandbLogger(ILogger):
    """Logs to a W&B run.

    Args:
        project: W&B project.
        name: run name (default: W&B's generated name).
        entity: W&B entity (team or user).
        log_batch_metrics: also log each batch's metrics (``<metric>_batch/<loader>``).
        log_epoch_metrics: log each loader's metrics at its end (``<metric>_epoch/<loader>``)
            and epoch-level values (``<metric>_epoch/_epoch_``).
        **kwargs: passed to ``wandb.init`` (``mode``, ``dir``, ``config``, ``tags``, ...).

    Every value is logged at step ``global_sample_step`` (training samples seen by all ranks,
    so curves of runs with different world sizes line up); images under
    ``<tag>_scope_<scope>_epoch_<epoch>.png``; hyper-parameters into the run's config. When a
    W&B run is already active in the logging process (``wandb.run``), the logger logs into it
    and leaves it open; otherwise it calls ``wandb.init`` and finishes the run when the
    experiment ends (exit code 1 when the experiment failed).
    """

    def __init__(
        self,
        project: str,
        name: str | None = None,
        entity: str | None = None,
        log_batch_metrics: bool = False,
        log_epoch_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        _wandb()  # fail here, in the user's script, when wandb is missing
        self.project = project
        self.name = name
        self.entity = entity
        self.log_batch_metrics = bool(log_batch_metrics)
        self.log_epoch_metrics = bool(log_epoch_metrics)
        self.kwargs = dict(kwargs)
        self._reset()

    def _reset(self) -> None:
        self.run: Any = None
        self._owns_run = False
        self._runner: IRunner = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy sent to another process starts its own run there, lazily (rank 0 only)
        state = self.__dict__.copy()
        state.update(run=None, _owns_run=False, _runner=None)
        return state

    @property
    def logger(self) -> Any:
        """The W&B run (None before the experiment starts and after it ends)."""
        return self.run

    def _start(self, runner: IRunner | None) -> Any:
        if runner is not None and self._runner is None:
            self._runner = runner_ref(runner)
        if self.run is None:
            wandb = _wandb()
            if wandb.run is not None:
                self.run = wandb.run
            else:
                options = {"allow_val_change": True, **self.kwargs}
                self.run = wandb.init(
                    project=self.project, name=self.name, entity=self.entity, **options
                )
                self._owns_run = True
        return self.run

    def _log(self, metrics: Mapping[str, Any], suffix: str, loader_key: str, step: int) -> None:
        values = {f"{k}_{suffix}/{loader_key}": v for k, v in scalar_metrics(metrics).items()}
        if values:
            self.run.log(values, step=int(step))

    @override
    def log_metrics(self, metrics: Mapping[str, Any], scope: Scope, runner: IRunner) -> None:
        step = runner.global_sample_step
        if scope == "batch" and self.log_batch_metrics:
            self._start(runner)
            self._log(metrics, "batch", runner.loader_key, step)
        elif scope == "loader" and self.log_epoch_metrics:
            self._start(runner)
            self._log(metrics, "epoch", runner.loader_key, step)
        elif scope == "epoch" and self.log_epoch_metrics and metrics.get(_EPOCH_KEY):
            self._start(runner)
            self._log(metrics[_EPOCH_KEY], "epoch", _EPOCH_KEY, step)

    @override
    def log_image(self, tag: str, image: Any, scope: Scope, runner: IRunner) -> None:
        run = self._start(runner)
        name = f"{tag}_scope_{scope}_epoch_{runner.global_epoch_step}.png"
        run.log({name: _wandb().Image(image_hwc(image))}, step=int(runner.global_sample_step))

    @override
    def log_hparams(self, hparams: Mapping[str, Any], runner: IRunner) -> None:
        run = self._start(runner)
        if hparams:
            run.config.update(dict(hparams), allow_val_change=True)

    @override
    def close_log(self) -> None:
        if self.run is None:
            return
        if self._owns_run:
            self.run.finish(exit_code=0 if outcome(self._runner) == "finished" else 1)
        self._reset()
