"""MLflowLogger: metrics, hyper-parameters and images of a run in MLflow (``ddprun[mlflow]``).

Catalyst 21.12's arguments and metric names; unlike Catalyst, the MLflow run is not started
when the logger is built but on its first use, which the runner makes on rank 0 only, at
experiment start. A logger built in a script that every rank runs (``python -m ddprun
--nproc N``), or sent to spawned workers, therefore makes one run, not one per process.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ddprun._optional import import_optional
from ddprun.loggers._external import flat_params, image_hwc, outcome, runner_ref
from ddprun.loggers.base import ILogger, Scope, scalar_metrics

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["MLflowLogger"]

_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call; 100 for params
_MAX_PARAMS = 100


def _mlflow() -> Any:
    return import_optional("mlflow", "mlflow", "MLflowLogger")


def _name(key: str) -> str:
    # MLflow accepts letters, digits, "_", "-", ".", " " and "/" in names
    return re.sub(r"[^\w\-. /]", "_", str(key))


class MLflowLogger(ILogger):
    """Logs to an MLflow tracking store: a local folder (``file:`` URI), a database
    (``sqlite:///path.db``) or a server.

    Args:
        experiment: MLflow experiment name (created when missing).
        run: run name (default: MLflow's generated name).
        tracking_uri: tracking store (default: MLflow's, i.e. ``MLFLOW_TRACKING_URI``).
            MLflow 3 refuses a ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``.
        registry_uri: model registry (default: MLflow's).
        exclude: hyper-parameter names (or ``"outer/inner"`` paths) not to log.
        log_batch_metrics: also log each batch's metrics (``<metric>/<loader>/batch`` at step
            ``global_batch_step``).
        log_epoch_metrics: log each epoch's metrics (``<metric>/<loader>/epoch`` at step
            ``global_epoch_step``, ``<metric>/_epoch_/epoch`` for epoch-level values).

    Hyper-parameters become MLflow params (nested dicts flattened to ``outer/inner``); images
    become artifacts ``<tag>_scope_<scope>_epoch_<epoch>.png``. When an MLflow run is already
    active in the logging process (``with mlflow.start_run(): runner.train(...)``), the logger
    logs into it and leaves it open; otherwise it starts a run and ends it when the experiment
    ends, as ``FINISHED``, ``FAILED`` or ``KILLED`` (stop signal, Ctrl-C, pruned Optuna trial).
    One run per experiment: training again with the same logger starts a new run.
    """

    def __init__(
        self,
        experiment: str,
        run: str | None = None,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        exclude: Iterable[str] | None = None,
        log_batch_metrics: bool = False,
        log_epoch_metrics: bool = True,
    ) -> None:
        _mlflow()  # fail here, in the user's script, when mlflow is missing
        if not experiment or not isinstance(experiment, str):
            raise ValueError(
                f"MLflowLogger: experiment must be a non-empty name, got {experiment!r}"
            )
        self.experiment = experiment
        self.run = run
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri
        self.exclude = list(exclude or [])
        self.log_batch_metrics = bool(log_batch_metrics)
        self.log_epoch_metrics = bool(log_epoch_metrics)
        self._reset()

    def _reset(self) -> None:
        self.run_id: str | None = None
        self._client: Any = None
        self._owns_run = False
        self._runner: IRunner = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy sent to another process starts its own run there, lazily (rank 0 only)
        state = self.__dict__.copy()
        state.update(run_id=None, _client=None, _owns_run=False, _runner=None)
        return state

    @property
    def logger(self) -> Any:
        """The ``mlflow`` module; its fluent API logs into this logger's run while it is
        active (on rank 0, during the experiment)."""
        return _mlflow()

    def _start(self, runner: IRunner | None) -> None:
        if runner is not None and self._runner is None:
            self._runner = runner_ref(runner)
        if self.run_id is not None:
            return
        mlflow = _mlflow()
        if self.tracking_uri is not None:
            mlflow.set_tracking_uri(self.tracking_uri)
        if self.registry_uri is not None:
            mlflow.set_registry_uri(self.registry_uri)
        experiment = mlflow.set_experiment(self.experiment)
        active = mlflow.active_run()
        if active is None:
            active = mlflow.start_run(run_name=self.run, experiment_id=experiment.experiment_id)
            self._owns_run = True
        elif self.run:
            mlflow.set_tag("mlflow.runName", self.run)
        self.run_id = active.info.run_id
        self._client = mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())

    def _log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, int(step)) for k, v in values.items()]
        for start in range(0, len(metrics), _MAX_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + _MAX_BATCH])

    @override
    def log_metrics(self, metrics: Mapping[str, Any], scope: Scope, runner: IRunner) -> None:
        if scope == "batch" and self.log_batch_metrics:
            self._start(runner)
            loader = _name(runner.loader_key)
            values = {f"{_name(k)}/{loader}/batch": v for k, v in scalar_metrics(metrics).items()}
            self._log(values, runner.global_batch_step)
        elif scope == "epoch" and self.log_epoch_metrics:
            self._start(runner)
            values = {
                f"{_name(name)}/{_name(loader_key)}/epoch": value
                for loader_key, per_loader in metrics.items()
                for name, value in scalar_metrics(per_loader).items()
            }
            self._log(values, runner.global_epoch_step)

    @override
    def log_image(self, tag: str, image: Any, scope: Scope, runner: IRunner) -> None:
        self._start(runner)
        name = f"{tag}_scope_{scope}_epoch_{runner.global_epoch_step}.png"
        self._client.log_image(self.run_id, image_hwc(image), name)

    @override
    def log_hparams(self, hparams: Mapping[str, Any], runner: IRunner) -> None:
        self._start(runner)
        from mlflow.entities import Param
        from mlflow.utils import validation

        limit = getattr(validation, "MAX_PARAM_VAL_LENGTH", 500)
        flat = flat_params(hparams, self.exclude)
        params = [Param(_name(k), str(v)[:limit]) for k, v in flat.items()]
        for start in range(0, len(params), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=params[start : start + _MAX_PARAMS])

    @override
    def close_log(self) -> None:
        if self.run_id is None:
            return
        status = _STATUS[outcome(self._runner)]
        if self._owns_run:
            mlflow = _mlflow()
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)
            else:  # the user switched runs meanwhile: end ours without touching theirs
                self._client.set_terminated(self.run_id, status=status)
        self._reset()
