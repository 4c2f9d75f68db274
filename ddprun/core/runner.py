"""IRunner: the one event loop (experiment > stage > epoch > loader > batch) and the run's state.

Runner state, readable by callbacks and user code at any point (counters are 1-based once
incremented):

=====================================  ===========================================================
attribute                              meaning
=====================================  ===========================================================
engine, device                         the engine in use and its torch device
model, criterion, optimizer, scheduler current stage's components (object or dict of them)
loaders, callbacks, loggers            current stage's dicts (loggers: rank 0 only)
stage_key, stage_epoch_len             stage name and its number of epochs
stage_epoch_step                       epoch within the stage (event: epoch_start)
global_epoch_step                      epochs over all stages (event: epoch_start)
global_batch_step, global_sample_step  train batches of this process / train samples of all ranks
                                       (event: batch_start, train loaders only)
loader_key, loader_batch_len           current loader and its number of batches on this rank
loader_batch_step, loader_sample_step  batches of this rank / samples of all ranks in this loader
loader_batch_size, batch_size          the loader's batch size / this batch's size on this rank
is_train_loader, is_valid_loader,      by key prefix: ``train*`` trains, ``infer*`` infers,
is_infer_loader                        anything else evaluates
batch, batch_metrics                   the batch dict `handle_batch` fills; this batch's metrics
loader_metrics, epoch_metrics          finished loader's metrics (floats, exact across ranks);
                                       ``{loader_key: {metric: float}}`` of the epoch
need_early_stop                        set by callbacks: ends the loader (mid-batch) or the stage
need_exception_reraise                 set False by a callback to swallow the run's exception
stop_signal                            a stop signal (SIGTERM, SIGUSR1) every rank agreed on
                                       (read-only): the run saves and stops
resumed_checkpoint                     the checkpoint the run resumes from, while the stage that
                                       starts is skipped or restored by it (else None)
loader_sync                            the loader's metric states, reduced at its end
=====================================  ===========================================================

How a loop ends, in one vocabulary:

- **early stop**: a callback sets ``need_early_stop``; the loader ends after this batch, and
  at an epoch's end the stage ends (the next stage runs).
- **agreed stop signal**: SIGTERM/SIGUSR1 set a flag the ranks agree on after a train batch
  or at a loader end (`ddprun.core.stop.StopControl`); ``stop_signal`` is set on every rank at
  the same point, callbacks save ``last.pth``, and `RunStopped` (exit 128 + signal) ends the
  run after that batch (agreed at a loader end: after the epoch).
- **error**: an exception ends the run; ``on_exception`` callbacks run and it is re-raised
  unless a callback sets ``need_exception_reraise = False``.

Resume (`ddprun.core.resume`): each stage start skips or restores the stage first.

Sample counters add ``batch_size * world_size`` per batch: curves of any world size line up.
For ``*_start`` events the runner's bookkeeping runs before the callbacks, for ``*_end`` events
after them. At loader end every tracked metric (`track_metric`) and the per-key averages of
`batch_metrics` are synced across ranks in one packed reduction, around ``on_loader_end``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from ddprun.core.batch_metrics import BatchMetrics
from ddprun.core.callback import Callback, Event, build_dispatch, keep_for_rank, sort_callbacks
from ddprun.core.loader_sync import LoaderSync
from ddprun.core.resume import Resume
from ddprun.core.runner_hooks import metrics_held_by, with_runner_hooks
from ddprun.core.runner_surface import RunnerSurface
from ddprun.core.stop import RunStopped, StopControl
from ddprun.data.introspect import batch_size_of, loader_batch_size, loader_length, set_loader_epoch
from ddprun.data.workers import shield_loader_workers
from ddprun.engines.factory import check_engine_fits_launch
from ddprun.engines.precision import NO_AUTOCAST
from ddprun.metrics import Metric
from ddprun.utils import epoch_seed, set_global_seed


class RunnerError(RuntimeError):
    """The runner was given something it cannot run (names what and what was expected)."""


class IRunner(RunnerSurface):
    """Owns the loop and the state; users override the ``get_*`` factories and `handle_batch`.

    Args:
        model: optional model (or dict of models) returned by the default `get_model`.
        engine: optional engine returned by the default `get_engine`.
    """

    #: Seconds of training between two stop-signal agreements across ranks (see `StopControl`).
    stop_check_seconds: float = 0.2
    #: The most batches between two agreements (fast steps: about 0.2% of a 1 ms DDP step).
    stop_check_max_batches: int = 64
    #: A fixed number of batches between agreements instead (None: from stop_check_seconds).
    stop_check_every_n_batches: int | None = None

    def __init__(self, model: Any = None, engine: Any = None) -> None:
        self.model = model
        self.engine = engine
        self.criterion = self.optimizer = self.scheduler = None
        self.trial: Any = None  # an optuna trial, when the run is one (Runner.train(trial=...))
        self.loaders: dict[str, Any] = {}
        self.callbacks: dict[str, Callback] = {}
        self.loggers: dict[str, Any] = {}
        self._bound: dict[Event, list[Any]] = {event: [] for event in Event}
        self._on_batch: tuple[list[Any], list[Any]] = ([], [])
        self._fp32 = True
        self._stop = StopControl()
        self.loader_sync = LoaderSync()
        self.resumed_checkpoint: dict[str, Any] | None = None
        self._reset_experiment_state()
        self.stage_key = "infer"
        self.stage_epoch_len = self.stage_epoch_step = 0
        self.loader_key, self.loader = None, None
        self.loader_batch_step = self.loader_sample_step = self.loader_batch_len = 0
        self.loader_batch_size: int | None = None
        self.is_train_loader = self.is_valid_loader = self.is_infer_loader = False
        self.batch, self.batch_size = None, 0
        self.batch_metrics: dict[str, Any] = BatchMetrics()
        self.loader_metrics: dict[str, float] = {}
        self.epoch_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        """The engine's torch device."""
        return self.engine.device

    @property
    def stop_signal(self) -> int | None:
        """The stop signal every rank agreed on (SIGTERM, SIGUSR1), or None."""
        return self._stop.signal

    # ----------------------------------------------------------- metric sync
    def track_metric(self, metric: Metric, batch_keys: Iterable[str] = ()) -> Metric:
        """Have `metric` synced across ranks at this loader's end, with everything else.

        Metric callbacks call this in ``on_loader_start`` (after the runner's reset).

        Args:
            metric: the stateful metric.
            batch_keys: keys this metric also writes into ``batch_metrics`` and computes
                exactly at loader end; the runner does not average those per batch.
        """
        return self.loader_sync.track(metric, batch_keys)

    # ------------------------------------------------------------------ logging
    def log_metrics(self, metrics: Mapping[str, Any], scope: str) -> None:
        """Hand `metrics` to every logger (rank 0 only has loggers)."""
        for logger in self.loggers.values():
            logger.log_metrics(metrics, scope, self)

    def log_image(self, tag: str, image: Any, scope: str = "loader") -> None:
        """Hand an image (HxWxC uint8 array or CxHxW tensor) to the loggers."""
        for logger in self.loggers.values():
            logger.log_image(tag, image, scope, self)

    # ---------------------------------------------------------------- the loop
    def run(self) -> IRunner:
        """Run the experiment: every stage, in this process or in spawned DDP workers."""
        self.engine = self.get_engine()
        check_engine_fits_launch(self.engine)  # before anything runs or is written
        if self.engine.needs_spawn():
            self.engine.spawn(self)
            return self
        self._run_guarded()
        return self

    def _run_guarded(self) -> None:
        self._stop = StopControl()
        self._stop.flag.install()
        try:
            self._run_experiment()
        except BaseException as error:
            # e.g. a collective timeout becomes an error naming the rank that hung
            self.exception = self.engine.explain_failure(error)
            self.need_exception_reraise = True
            self._fire_callbacks(Event.EXCEPTION)
            self._close_loggers()
            if not self.need_exception_reraise:
                return
            if self.exception is error:
                raise
            raise self.exception from error
        finally:
            self._stop.flag.uninstall()

    def _run_experiment(self) -> None:
        self._reset_experiment_state()
        self.engine.setup()
        self._stop.start_run(self.engine, self)  # paced by this runner's stop_check_*
        self.loggers = dict(self.get_loggers() or {}) if self.engine.is_master else {}
        self._batch_loggers = [
            lg for lg in self.loggers.values() if getattr(lg, "log_batch_metrics", False)
        ]
        for logger in self.loggers.values():
            logger.log_hparams(self.hparams, self)
        for index, stage in enumerate(self.stages):
            self._run_stage(stage, first=index == 0)
        self._fire_callbacks(Event.EXPERIMENT_END)
        self._close_loggers()
        # only after success: tearing a group down while a peer has failed can hang, so a
        # failing worker leaves that to its process exit
        self.engine.teardown()

    def _run_stage(self, stage: str, first: bool) -> None:
        self._start_stage(stage)
        self._resume.at_stage_start(self)  # skips the stage, restores it, or nothing
        if first:  # callbacks are built per stage: the first stage's get experiment_start
            self._fire_callbacks(Event.EXPERIMENT_START)
        self._fire_callbacks(Event.STAGE_START)
        while self.stage_epoch_step < self.stage_epoch_len:
            self._run_epoch()
            if self.need_early_stop:
                self.need_early_stop = False
                break
        self._fire_callbacks(Event.STAGE_END)
        self.model = self.engine.unwrap(self.model)
        self.criterion = self.engine.unwrap(self.criterion)

    def _run_epoch(self) -> None:
        self.global_epoch_step += 1
        self.stage_epoch_step += 1
        self.epoch_metrics = {}
        set_global_seed(epoch_seed(self.seed, self.global_epoch_step, self.engine))
        self._fire_callbacks(Event.EPOCH_START)
        position = self._resume.take_position(self)
        for loader_key, loader in self.loaders.items():
            if position is not None and loader_key != position["loader_key"]:
                continue  # finished before the mid-epoch checkpoint was written
            self._run_loader(loader_key, loader, position)
            position = None
        self._fire_callbacks(Event.EPOCH_END)
        self.log_metrics(self.epoch_metrics, scope="epoch")
        for logger in self.loggers.values():
            logger.flush_log()
        if self._stop.signal is not None:  # agreed at a loader end: saved with the epoch
            raise RunStopped(self._stop.signal)

    def _run_loader(self, loader_key: str, loader: Any, position: Any = None) -> None:
        self._start_loader(loader_key, loader)
        self._fire_callbacks(Event.LOADER_START)
        # meters the runner holds (made in on_loader_start) join the loader's reduction
        self.loader_sync.track_new(metrics_held_by(self), self.device)
        if position is None:
            batches = iter(loader)
        else:
            batches = self._resume.continue_loader(self, loader, position)
        with torch.set_grad_enabled(self.is_train_loader):
            self._run_batches(batches)
        self._end_loader()

    def _run_batches(self, batches: Iterator[Any]) -> None:
        """The hot loop: what stays the same over a loader is read once, not per batch."""
        engine, stop, sync, on_batch = self.engine, self._stop, self.loader_sync, self._on_batch
        train, world, (on_start, on_end) = self.is_train_loader, engine.world_size, on_batch
        for batch in batches:
            self.batch = engine.move(batch)
            self.batch_size = size = batch_size_of(self.batch)
            self.batch_metrics = BatchMetrics()  # a dict; metric values computed when read
            self.loader_batch_step += 1
            self.loader_sample_step += size * world
            if train:
                self.global_batch_step += 1
                self.global_sample_step += size * world
            for method in on_start:
                method(self)
            if self._fp32:  # batch_start callbacks may have replaced self.batch
                self.handle_batch(self.batch)
            else:
                with engine.autocast():
                    self.handle_batch(self.batch)
            if train:
                # before batch_end, so CheckpointCallback saves this batch when a stop is agreed
                stop.after_train_batch()
            for method in on_end:
                method(self)
            sync.add_batch(self.batch_metrics, self.batch_size)
            for logger in self._batch_loggers:
                logger.log_metrics(self.batch_metrics, "batch", self)
            if train and stop.signal is not None:
                # agreed at this batch (saved by CheckpointCallback); a stop agreed at a loader
                # end waits for the epoch's end and its checkpoint instead
                raise RunStopped(stop.signal)
            if self.need_early_stop:
                self.need_early_stop = False
                break

    # ------------------------------------------------------------- bookkeeping
    def _reset_experiment_state(self) -> None:
        self.global_epoch_step = self.global_batch_step = self.global_sample_step = 0
        self.need_early_stop = False
        self.need_exception_reraise = True
        self.exception: BaseException | None = None
        self.loader_sync.start_run()
        self._resume = Resume()
        self._batch_loggers: list[Any] = []

    def _start_stage(self, stage: str) -> None:
        self.stage_key = stage
        self.stage_epoch_len = int(self.get_stage_len(stage))
        self.stage_epoch_step = 0
        # Same seed on every rank: components must start identical everywhere.
        set_global_seed(self.seed + self.global_epoch_step)
        self.loaders = self.engine.prepare_loaders(
            _check_loaders(self.get_loaders(stage)), self.seed
        )
        shield_loader_workers(self.loaders)  # stop signals are the rank's, not its workers'
        model = self.get_model(stage)
        if model is None:
            raise RunnerError(f"get_model({stage!r}) returned None; expected a module or a dict")
        self.criterion = self.get_criterion(stage)
        self.optimizer = self.get_optimizer(stage, model)
        self.scheduler = self.get_scheduler(stage, self.optimizer)
        self.model = self.engine.prepare_model(model)
        self.optimizer = self.engine.prepare_optimizer(self.optimizer)  # FSDP: sharded params
        self.criterion = self.engine.prepare_criterion(self.criterion)
        callbacks = sort_callbacks(self.get_callbacks(stage))
        rank = self.engine.rank
        self.callbacks = {k: cb for k, cb in callbacks.items() if keep_for_rank(cb, rank)}
        dispatch = build_dispatch(self.callbacks)
        # bound methods, resolved once per stage: no getattr per callback and event
        bound = {e: [getattr(c, e.value) for c in cbs] for e, cbs in dispatch.items()}
        # the runner is a callback too: its own overridden on_* methods join the dispatch
        self._bound = with_runner_hooks(self, bound)
        self._on_batch = (self._bound[Event.BATCH_START], self._bound[Event.BATCH_END])
        self._fp32 = self.engine.autocast() is NO_AUTOCAST  # no autocast context per batch

    def _start_loader(self, loader_key: str, loader: Any) -> None:
        self.loader_key = loader_key
        self.loader = loader
        self.is_train_loader = loader_key.startswith("train")
        self.is_infer_loader = loader_key.startswith("infer")
        self.is_valid_loader = not (self.is_train_loader or self.is_infer_loader)
        self.loader_batch_len = loader_length(loader)
        self.loader_batch_size = loader_batch_size(loader)
        self.loader_batch_step = self.loader_sample_step = 0
        self.loader_metrics = {}
        self.loader_sync.start_loader(self.device)
        _set_train_mode(self.model, self.is_train_loader)
        set_loader_epoch(loader, self.global_epoch_step)
        self._stop.start_loader()

    def _end_loader(self) -> None:
        # Evaluation splits may differ by a batch across ranks (a rank may have none), so loader
        # ends are where all ranks meet to agree on a stop, inside the one metric reduction; a
        # stop agreed here takes effect after the epoch's checkpoint.
        signum = self._stop.loader_end_signal()
        self.loader_sync.reduce(self.engine, self.device, signum, self._on_loader_synced)
        if self.is_train_loader:  # after OptimizerCallback stepped any window left open
            self.engine.finish_steps()
        self.loader_metrics = {k: _to_float(v) for k, v in self.loader_metrics.items()}
        self.epoch_metrics[self.loader_key] = dict(self.loader_metrics)
        self.log_metrics(self.loader_metrics, scope="loader")

    def _on_loader_synced(self, means: dict[str, float], stop_signal: int | None) -> None:
        """Inside the loader-end reduction: the averages of ``batch_metrics`` first (as
        Catalyst's CriterionCallback has the loss there before later callbacks and the
        runner's own on_loader_end; a callback's value wins), then the callbacks."""
        self._stop.signal = stop_signal
        self.loader_metrics.update(means)
        self._fire_callbacks(Event.LOADER_END)

    def _fire_callbacks(self, event: Event) -> None:
        for method in self._bound[event]:
            method(self)

    def _close_loggers(self) -> None:
        for logger in self.loggers.values():
            logger.flush_log()
            logger.close_log()


def _check_loaders(loaders: Any) -> dict[str, Any]:
    if not isinstance(loaders, Mapping) or not loaders:
        raise RunnerError(f"get_loaders must return a non-empty dict of loaders, got {loaders!r}")
    for key, loader in loaders.items():
        if loader_length(loader) == 0:
            raise RunnerError(f"loader {key!r} is empty (0 batches); every loader needs data")
    return dict(loaders)


def _set_train_mode(model: Any, train: bool) -> None:
    modules = model.values() if isinstance(model, Mapping) else [model]
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.train(train)


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach())
    return float(value)
