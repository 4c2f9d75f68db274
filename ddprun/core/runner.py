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
resume_position, resume_plan           set by CheckpointCallback when a run resumes
stop_signal                            a stop signal (SIGTERM, SIGUSR1) every rank agreed on
                                       after this batch: the run saves and stops
=====================================  ===========================================================

Sample counters add ``batch_size * world_size`` per batch, so curves from runs of different
world sizes line up (the last, uneven batch of an unpadded evaluation split is counted as full).

Dispatch: for ``*_start`` events the runner's own bookkeeping runs before the callbacks, for
``*_end`` events after them, so metric callbacks fill `loader_metrics` before it is logged. At
loader end every tracked metric (see `track_metric`) and the per-key averages of `batch_metrics`
are synced across ranks together, in one packed reduction, around the callbacks' ``on_loader_end``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ddprun.core import loader_sync, resume
from ddprun.core.callback import Callback, Event, build_dispatch, keep_for_rank, sort_callbacks
from ddprun.core.runner_hooks import RunnerHooks, metrics_held_by, with_runner_hooks
from ddprun.core.stop import RunStopped, StopFlag, StopVote
from ddprun.data.workers import shield_loader_workers
from ddprun.engines.factory import check_engine_fits_launch, default_engine
from ddprun.metrics import AdditiveMetric, Metric, synchronized
from ddprun.utils import set_global_seed


class RunnerError(RuntimeError):
    """The runner was given something it cannot run (names what and what was expected)."""


class IRunner(RunnerHooks):
    """Owns the loop and the state; users override the ``get_*`` factories and `handle_batch`.

    Args:
        model: optional model (or dict of models) returned by the default `get_model`.
        engine: optional engine returned by the default `get_engine`.
    """

    #: Seconds of training between two stop-signal agreements across ranks (a small pipelined
    #: collective, DDP only). The number of batches between agreements follows the measured
    #: step time, between 1 and `stop_check_max_batches`, and is itself agreed by all ranks.
    #: An agreement's answer arrives at the next one, so a SIGTERM takes effect within about
    #: two intervals on every rank.
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
        self._dispatch: dict[Event, list[Callback]] = {event: [] for event in Event}
        self._bound: dict[Event, list[Any]] = {event: [] for event in Event}
        self._stop_flag = StopFlag()
        self._reset_experiment_state()
        self.stage_key = "infer"
        self.stage_epoch_len = self.stage_epoch_step = 0
        self.loader_key, self.loader = None, None
        self.loader_batch_step = self.loader_sample_step = self.loader_batch_len = 0
        self.loader_batch_size: int | None = None
        self.is_train_loader = self.is_valid_loader = self.is_infer_loader = False
        self.batch: Any = None
        self.batch_size = 0
        self.batch_metrics: dict[str, Any] = {}
        self.loader_metrics: dict[str, float] = {}
        self.epoch_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------ user surface
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

    @property
    def device(self) -> torch.device:
        """The engine's torch device."""
        return self.engine.device

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
        from ddprun.loggers import ConsoleLogger

        return {"console": ConsoleLogger()}

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
        if type(self)._handle_batch is not IRunner._handle_batch:
            return self._handle_batch(batch)
        raise NotImplementedError(f"{type(self).__name__} must define handle_batch(self, batch)")

    def _handle_batch(self, batch: Any) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------- metric sync
    def track_metric(self, metric: Metric, batch_keys: Iterable[str] = ()) -> Metric:
        """Have `metric` synced across ranks at this loader's end, with everything else.

        Metric callbacks call this in ``on_loader_start`` (after the runner's reset).

        Args:
            metric: the stateful metric.
            batch_keys: keys this metric also writes into ``batch_metrics`` and computes
                exactly at loader end; the runner does not average those per batch.
        """
        self._tracked_metrics.append(metric)
        self._exact_keys.update(batch_keys)
        return metric

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
        self._stop_flag = StopFlag()
        self._stop_flag.install()
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
            self._stop_flag.uninstall()

    def _run_experiment(self) -> None:
        self._reset_experiment_state()
        self.engine.setup()
        self.loggers = dict(self.get_loggers() or {}) if self.engine.is_master else {}
        self._batch_loggers = [lg for lg in self.loggers.values() if _logs_batches(lg)]
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
        position = self._take_resume_position()
        for loader_key, loader in self.loaders.items():
            if position is not None and loader_key != position["loader_key"]:
                continue  # finished before the mid-epoch checkpoint was written
            self._run_loader(loader_key, loader, position)
            position = None
        self._fire_callbacks(Event.EPOCH_END)
        self.log_metrics(self.epoch_metrics, scope="epoch")
        for logger in self.loggers.values():
            logger.flush_log()
        if self.stop_signal is not None:
            raise RunStopped(self.stop_signal)

    def _run_loader(self, loader_key: str, loader: Any, position: Any = None) -> None:
        self._start_loader(loader_key, loader)
        self._fire_callbacks(Event.LOADER_START)
        for metric in metrics_held_by(self):  # e.g. meters the runner made in on_loader_start
            if all(metric is not tracked for tracked in self._tracked_metrics):
                # on the engine's device: the packed reduction runs there (NCCL: the GPU)
                self._tracked_metrics.append(metric.to(self.device))
        batches = iter(loader) if position is None else self._resume_loader(loader, position)
        with torch.set_grad_enabled(self.is_train_loader):
            for batch in batches:
                self._run_batch(batch)
                if self.need_early_stop:
                    self.need_early_stop = False
                    break
        self._end_loader()

    def _run_batch(self, batch: Any) -> None:
        self.batch = self.engine.move(batch)
        self.batch_size = _batch_size(self.batch)
        self.batch_metrics = {}
        samples = self.batch_size * self.engine.world_size
        self.loader_batch_step += 1
        self.loader_sample_step += samples
        if self.is_train_loader:
            self.global_batch_step += 1
            self.global_sample_step += samples
        self._fire_callbacks(Event.BATCH_START)
        with self.engine.autocast():
            self.handle_batch(self.batch)
        if self.is_train_loader:
            self._stop_countdown -= 1
            if self._stop_countdown <= 0:
                # Every rank runs as many train batches and counts down from the same agreed
                # number, so all agree at the same batch; agreed before batch_end, so
                # CheckpointCallback saves this batch's state.
                self._agree_to_stop()
        self._fire_callbacks(Event.BATCH_END)
        self._average_batch_metrics()
        if self._batch_loggers:
            for logger in self._batch_loggers:
                logger.log_metrics(self.batch_metrics, "batch", self)
        if self.is_train_loader and self.stop_signal is not None:
            # agreed at this batch (saved by CheckpointCallback); a stop agreed at a loader end
            # waits for the epoch's end and its checkpoint instead
            raise RunStopped(self.stop_signal)

    def _agree_to_stop(self) -> None:
        """Agree on the stop flag, and on the number of batches to the next agreement."""
        now = time.perf_counter()
        if self.stop_check_every_n_batches is not None:
            proposal = max(1, int(self.stop_check_every_n_batches))
        elif self._stop_from_loader_start and self._stop_check_batches < 2:
            # measured from the loader's start, one batch covers no batch_end callbacks (the
            # backward and step): too short a step; measure again over the next batch
            proposal = 1
        else:
            step = (now - self._stop_check_time) / max(self._stop_check_batches, 1)
            proposal = self.stop_check_seconds / step if step > 0 else self.stop_check_max_batches
            proposal = int(min(max(proposal, 1), self.stop_check_max_batches))
        self._stop_from_loader_start = False
        signum, every = _agreement(self.engine.agree_to_stop(self._stop_flag.signum, proposal))
        self._adopt_agreement(signum, every)
        self._stop_countdown = self._stop_check_batches = self._stop_every
        self._stop_check_time = now

    def _adopt_agreement(self, signum: int | None, every: int | None) -> None:
        # None: no agreement was in flight (the first one, or the first after a loader end);
        # every rank gets the same answers at the same calls, so all keep the same count
        if signum is not None:
            self.stop_signal = signum
        if every is not None:
            self._stop_every = every

    # ------------------------------------------------------------------ resume
    def _take_resume_position(self) -> dict[str, Any] | None:
        position, self.resume_position = self.resume_position, None
        if position is None or position["global_epoch_step"] != self.global_epoch_step:
            return None
        self.epoch_metrics = {k: dict(v) for k, v in position["epoch_metrics"].items()}
        return position

    def _resume_loader(self, loader: Any, position: dict[str, Any]) -> Any:
        """Continue `loader` after the batch a mid-epoch checkpoint was written at."""
        batches = resume.skip_consumed(loader, position)
        self.loader_batch_step = int(position["loader_batch_step"])
        self.loader_sample_step = int(position["loader_sample_step"])
        resume.restore_metrics(self, position)
        resume.restore_rng(self, position)  # after iter(): a DataLoader draws its seed there
        return batches

    # ------------------------------------------------------------- bookkeeping
    def _reset_experiment_state(self) -> None:
        self.global_epoch_step = self.global_batch_step = self.global_sample_step = 0
        self.need_early_stop = False
        self.need_exception_reraise = True
        self.stop_signal: int | None = None
        self.exception: BaseException | None = None
        self._tracked_metrics: list[Metric] = []
        self._exact_keys: set[str] = set()
        self._batch_averages: dict[str, AdditiveMetric] = {}
        self._batch_loggers: list[Any] = []
        # batch-metric keys every rank packs at loader end (None: not agreed yet this run)
        self._agreed_keys: set[str] | None = None
        # batches to the next stop agreement: the same on every rank (see _agree_to_stop); the
        # first agreement comes after one batch (adaptive) and sets the pace from then on
        fixed = self.stop_check_every_n_batches
        self._stop_every = 1 if fixed is None else max(1, int(fixed))
        self._stop_countdown = self._stop_check_batches = self._stop_every
        self._stop_check_time = 0.0
        self._stop_from_loader_start = True
        # Set by CheckpointCallback when resuming: the mid-epoch position to continue from,
        # and the loaded checkpoint of a resume that was asked for (consumed once).
        self.resume_position: dict[str, Any] | None = None
        self.resume_plan: dict[str, Any] | None = None

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
        self.criterion = self.engine.prepare_criterion(self.criterion)
        callbacks = sort_callbacks(self.get_callbacks(stage))
        rank = self.engine.rank
        self.callbacks = {k: cb for k, cb in callbacks.items() if keep_for_rank(cb, rank)}
        self._dispatch = build_dispatch(self.callbacks)
        # bound methods, resolved once per stage: no getattr per callback and event
        bound = {e: [getattr(c, e.value) for c in cbs] for e, cbs in self._dispatch.items()}
        # the runner is a callback too: its own overridden on_* methods join the dispatch
        self._bound = with_runner_hooks(self, bound)

    def _start_loader(self, loader_key: str, loader: Any) -> None:
        self.loader_key = loader_key
        self.loader = loader
        self.is_train_loader = loader_key.startswith("train")
        self.is_infer_loader = loader_key.startswith("infer")
        self.is_valid_loader = not (self.is_train_loader or self.is_infer_loader)
        self.loader_batch_len = _length(loader)
        self.loader_batch_size = _loader_batch_size(loader)
        self.loader_batch_step = self.loader_sample_step = 0
        self.loader_metrics = {}
        self._tracked_metrics = []
        self._exact_keys: set[str] = set()
        self._batch_averages = {}
        _set_train_mode(self.model, self.is_train_loader)
        _set_sampler_epoch(loader, self.global_epoch_step)
        # step time for the next stop-agreement interval: measured from here, not across the
        # loader-end sync or evaluation
        self._stop_check_time = time.perf_counter()
        self._stop_check_batches = self._stop_countdown
        self._stop_from_loader_start = True

    def _average_batch_metrics(self) -> None:
        # Every batch_metrics value is averaged over the loader, weighted by batch size, in
        # tensors on the device: no host sync per batch.
        for key, value in self.batch_metrics.items():
            if key in self._exact_keys:
                continue
            average = self._batch_averages.get(key)
            if average is None:
                average = AdditiveMetric(metric_key=key, with_std=False).to(self.device)
                self._batch_averages[key] = average
            average.update(value, self.batch_size)

    def _end_loader(self) -> None:
        # Evaluation splits may differ by a batch across ranks (a rank may have none), so loader
        # ends are where all ranks meet to agree on a stop, inside the one metric reduction; a
        # stop agreed here takes effect after the epoch's checkpoint.
        in_flight, every = _agreement(self.engine.drain_stop_agreement())
        if every is not None:
            self._stop_every = every  # the drained answer still sets the pace, on every rank
        signum = self._stop_flag.signum or in_flight
        collectives = self.engine.collectives
        if collectives is not None and self._agreed_keys is None:
            self._agreed_keys = loader_sync.gather_keys(self._batch_averages, set(), self.engine)
        while not self._sync_loader(signum, collectives):
            # a rank logged a key the others do not pack yet: agree on the keys, reduce again
            self._agreed_keys = loader_sync.gather_keys(
                self._batch_averages, self._agreed_keys, self.engine
            )
        self.loader_metrics = {k: _to_float(v) for k, v in self.loader_metrics.items()}
        self.epoch_metrics[self.loader_key] = dict(self.loader_metrics)
        self.log_metrics(self.loader_metrics, scope="loader")

    def _sync_loader(self, signum: int | None, collectives: Any) -> bool:
        """One packed reduction of every metric state, then the loader-end callbacks inside it.

        Returns False, having run no callback, when some rank holds batch-metric keys outside
        the agreed set (see `ddprun.core.loader_sync`).
        """
        agreed = self._agreed_keys if collectives is not None else None
        averages = loader_sync.averages_to_pack(self._batch_averages, agreed, self.device)
        outside = agreed is not None and not agreed.issuperset(self._batch_averages)
        vote, keys = StopVote(signum, self.device), loader_sync.KeyVote(outside, self.device)
        metrics = [*self._tracked_metrics, *averages.values(), vote, keys]
        with synchronized(metrics, collectives):
            if not keys.compute():
                return False
            self.stop_signal = vote.compute()
            # the averages first, as Catalyst's CriterionCallback has the loss there before
            # later callbacks and the runner's own on_loader_end; a callback's value wins
            for key, average in averages.items():
                mean = loader_sync.mean_if_reported(average)
                if mean is not None:
                    self.loader_metrics[key] = mean
            self._fire_callbacks(Event.LOADER_END)
        if self.is_train_loader:  # after OptimizerCallback stepped any window left open
            self.engine.finish_steps()
        return True

    def _fire_callbacks(self, event: Event) -> None:
        for method in self._bound[event]:
            method(self)

    def _close_loggers(self) -> None:
        for logger in self.loggers.values():
            logger.flush_log()
            logger.close_log()


# --------------------------------------------------------------------- helpers
def epoch_seed(seed: int, epoch: int, engine: Any) -> int:
    """The seed of one rank's epoch: ``seed + epoch * world_size + rank``.

    Distinct for every (epoch, rank) pair of a run, so no rank replays another rank's random
    stream of another epoch (``seed + epoch + rank`` made rank 0 at epoch e+1 repeat rank 1
    at epoch e); in one process it is ``seed + epoch``, as before.
    """
    return seed + epoch * max(engine.world_size, 1) + max(engine.rank, 0)


def _agreement(answer: Any) -> tuple[int | None, int | None]:
    """An engine's stop agreement as ``(signal, batches to the next check)``; engines written
    before the interval was agreed return the signal alone."""
    if isinstance(answer, tuple):
        return answer
    return answer, None


def _logs_batches(logger: Any) -> bool:
    return bool(getattr(logger, "log_batch_metrics", False))


def _check_loaders(loaders: Any) -> dict[str, Any]:
    if not isinstance(loaders, Mapping) or not loaders:
        raise RunnerError(f"get_loaders must return a non-empty dict of loaders, got {loaders!r}")
    for key, loader in loaders.items():
        if _length(loader) == 0:
            raise RunnerError(f"loader {key!r} is empty (0 batches); every loader needs data")
    return dict(loaders)


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:  # iterable-style loaders have no length
        return None


def _batch_size(batch: Any) -> int:
    first = batch
    if isinstance(batch, Mapping):
        first = next(iter(batch.values()), None)
    elif isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
    if isinstance(first, torch.Tensor):
        return int(first.shape[0]) if first.dim() else 1
    return len(first) if hasattr(first, "__len__") else 1


def _loader_batch_size(loader: Any) -> int | None:
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size


def _set_train_mode(model: Any, train: bool) -> None:
    modules = model.values() if isinstance(model, Mapping) else [model]
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.train(train)


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for candidate in (sampler, getattr(batch_sampler, "sampler", None), batch_sampler):
        if hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
            return
    # an iterable dataset reseeds its own stream (webdataset, HF datasets style)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach())
    return float(value)
