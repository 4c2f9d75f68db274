"""Runner: the high-level runner: ``train(...)``, ``predict_batch``, ``predict_loader``,
``evaluate_loader``, on top of IRunner's loop (one stage named "train")."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable, Mapping
from typing import Any

import torch

from ddprun.core.callback import Callback, sort_callbacks
from ddprun.core.runner import IRunner, RunnerError
from ddprun.utils import set_global_seed


class Runner(IRunner):
    """Single-stage runner configured by `train(...)`; the user writes `handle_batch`.

    `train` stores its arguments and calls `run()`; the ``get_*`` methods then hand them to
    the loop. With ``logdir``, CSV and TensorBoard loggers and a CheckpointCallback on
    ``valid_loader``/``valid_metric`` are added (each only if the user gave none of that type).
    """

    def __init__(self, model: Any = None, engine: Any = None) -> None:
        super().__init__(model=model, engine=engine)
        self._stage = "train"
        self._num_epochs = 1
        self._loaders: Mapping[str, Any] | None = None
        self._criterion = self._optimizer = self._scheduler = None
        self._callbacks: dict[str, Callback] = {}
        self._loggers: dict[str, Any] | None = None
        self._seed = 42
        self._hparams: dict[str, Any] = {}

    # --------------------------------------------------------- IRunner factories
    @property
    def stages(self) -> list[str]:
        return [self._stage]

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def hparams(self) -> dict[str, Any]:
        return self._hparams

    def get_stage_len(self, stage: str) -> int:
        return self._num_epochs

    def get_loggers(self) -> dict[str, Any]:
        return dict(self._loggers) if self._loggers is not None else super().get_loggers()

    def get_loaders(self, stage: str) -> Mapping[str, Any]:
        if self._loaders is None:
            raise RunnerError("no loaders: call train(loaders=...) or override get_loaders")
        return self._loaders

    def get_criterion(self, stage: str) -> Any:
        return self._criterion

    def get_optimizer(self, stage: str, model: Any) -> Any:
        return self._optimizer

    def get_scheduler(self, stage: str, optimizer: Any) -> Any:
        return self._scheduler

    def get_callbacks(self, stage: str) -> dict[str, Callback]:
        return dict(self._callbacks)

    # -------------------------------------------------------------------- train
    def train(
        self,
        *,
        model: Any,
        loaders: Mapping[str, Any],
        criterion: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        engine: Any = None,
        callbacks: Mapping[str, Callback] | Iterable[Callback] | None = None,
        loggers: Mapping[str, Any] | None = None,
        seed: int = 42,
        hparams: Mapping[str, Any] | None = None,
        num_epochs: int = 1,
        logdir: str | os.PathLike | None = None,
        valid_loader: str = "valid",
        valid_metric: str = "loss",
        minimize_valid_metric: bool = True,
        verbose: bool = False,
        timeit: bool = False,
        load_best_on_end: bool = False,
        resume: str | None = None,
        amp: bool = False,
        ddp: bool = False,
    ) -> None:
        """Train `model` on `loaders` for `num_epochs` epochs (one stage, "train").

        Args:
            model: a module or a dict of modules.
            loaders: ordered dict of loaders; ``train*`` keys train, others evaluate.
            criterion, optimizer, scheduler: objects or dicts of them.
            engine: the engine; default chosen from `amp`/`ddp` and the hardware.
            callbacks: dict or list of callbacks.
            loggers: dict of loggers (default: console; plus CSV and TensorBoard with logdir).
            seed: base seed. hparams: logged as hyper-parameters.
            logdir: run folder for checkpoints, CSV and TensorBoard logs.
            valid_loader, valid_metric, minimize_valid_metric: checkpoint selection.
            verbose: add a progress bar. timeit: add TimerCallback.
            load_best_on_end: load the best checkpoint into the model after training
                (needs `logdir`).
            resume: a checkpoint path to restore full state from before training.
            amp, ddp: pick AMPEngine / DistributedDataParallel(AMP)Engine when `engine` is None.
        """
        from ddprun import callbacks as cbs
        from ddprun import loggers as lgs

        if load_best_on_end and logdir is None:
            raise RunnerError("load_best_on_end=True needs a logdir to save the best checkpoint in")
        if num_epochs < 1:
            raise RunnerError(f"num_epochs must be >= 1, got {num_epochs}")
        if logdir is not None and valid_loader not in loaders:
            raise RunnerError(
                f"valid_loader={valid_loader!r} is not a loader key (have {list(loaders)}); "
                "pass valid_loader= naming the loader whose metric selects the best checkpoint"
            )
        self.model = model
        self.engine = engine if engine is not None else _default_engine(amp=amp, ddp=ddp)
        self._loaders, self._num_epochs, self._seed = loaders, int(num_epochs), int(seed)
        self._criterion, self._optimizer, self._scheduler = criterion, optimizer, scheduler
        self._hparams = dict(hparams or {})
        self._loggers = _default_loggers(loggers, logdir, lgs)
        callbacks = sort_callbacks(callbacks)
        if verbose and not _has(callbacks, cbs.TqdmCallback):
            callbacks["_verbose"] = cbs.TqdmCallback()
        if timeit and not _has(callbacks, cbs.TimerCallback):
            callbacks["_timer"] = cbs.TimerCallback()
        if logdir is not None and not _has(callbacks, cbs.CheckpointCallback):
            callbacks["_checkpoint"] = cbs.CheckpointCallback(
                logdir=logdir,
                loader_key=valid_loader,
                metric_key=valid_metric,
                minimize=minimize_valid_metric,
                resume=resume,
                load_on_stage_end="best" if load_best_on_end else None,
            )
        elif resume is not None and not _has(callbacks, cbs.CheckpointCallback):
            callbacks["_resume"] = cbs.CheckpointCallback(logdir=None, resume=resume)
        for callback in callbacks.values():  # the user's own CheckpointCallback honours them too
            if isinstance(callback, cbs.CheckpointCallback):
                callback.apply_train_options(load_best_on_end, resume)
        self._callbacks = callbacks
        self.run()

    # ---------------------------------------------------------------- inference
    def predict_batch(self, batch: Any, **kwargs: Any) -> Any:
        """Model output for one batch; define it in your runner for `predict_loader`."""
        raise NotImplementedError(f"{type(self).__name__} must define predict_batch(self, batch)")

    def predict_loader(
        self,
        *,
        loader: Iterable[Any],
        model: Any = None,
        engine: Any = None,
        seed: int = 42,
        resume: str | None = None,
    ) -> Generator[Any, None, None]:
        """Yield `predict_batch(batch)` for every batch, in eval mode without gradients.

        Uses the given engine, else the runner's, else a DeviceEngine; `resume` loads model
        weights from a checkpoint first.
        """
        from ddprun.engines import DeviceEngine

        self.engine = engine or self.engine or DeviceEngine()
        model = model if model is not None else self.model
        if model is None:
            raise RunnerError("predict_loader needs a model: pass model= or train first")
        if resume is not None:
            self.engine.unpack_checkpoint(
                self.engine.load_checkpoint(resume), model=model, source=str(resume)
            )
        self.model = self.engine.prepare_model(self.engine.unwrap(model))
        set_global_seed(seed)
        _eval_mode(self.model)
        for batch in loader:
            with torch.no_grad():  # not around the yield: the caller's code keeps its grad mode
                output = self.predict_batch(batch)
            yield output

    def evaluate_loader(
        self,
        loader: Any,
        callbacks: Mapping[str, Callback] | Iterable[Callback] | None = None,
        model: Any = None,
        seed: int = 42,
        verbose: bool = False,
    ) -> dict[str, float]:
        """Run one evaluation pass over `loader` and return its loader metrics.

        Keeps this runner's engine and criterion (no engine re-selection); `callbacks=None`
        works and gives the averages of whatever `handle_batch` puts in `batch_metrics`.
        """
        from ddprun import callbacks as cbs

        callbacks = sort_callbacks(callbacks)
        if _has(callbacks, cbs.CheckpointCallback):
            raise RunnerError("evaluate_loader takes no CheckpointCallback (it trains nothing)")
        model = model if model is not None else self.model
        if model is None:
            raise RunnerError("evaluate_loader needs a model: pass model= or train first")
        self.train(
            model=self.engine.unwrap(model) if self.engine is not None else model,
            loaders={"valid": loader},
            criterion=self._criterion,
            engine=self.engine,
            callbacks=callbacks,
            loggers={},
            seed=seed,
            num_epochs=1,
            verbose=verbose,
        )
        return dict(self.loader_metrics)


def _has(callbacks: Mapping[str, Callback], kind: type) -> bool:
    return any(isinstance(cb, kind) for cb in callbacks.values())


def _default_engine(amp: bool, ddp: bool) -> Any:
    from ddprun import engines

    if ddp:
        return (
            engines.DistributedDataParallelAMPEngine()
            if amp
            else engines.DistributedDataParallelEngine()
        )
    return engines.AMPEngine() if amp else engines.DeviceEngine()


def _default_loggers(loggers: Mapping[str, Any] | None, logdir: Any, lgs: Any) -> dict[str, Any]:
    result = dict(loggers) if loggers is not None else {"_console": lgs.ConsoleLogger()}
    if logdir is None:
        return result
    # add a CSV and a TensorBoard logger unless the user gave one of that kind
    for key, kind in (("_csv", lgs.CSVLogger), ("_tensorboard", lgs.TensorboardLogger)):
        if not any(isinstance(lg, kind) for lg in result.values()):
            result[key] = kind(logdir=logdir)
    return result


def _eval_mode(model: Any) -> None:
    for module in model.values() if isinstance(model, Mapping) else [model]:
        module.eval()
