"""Runner: the high-level runner: ``train(...)``, ``predict_batch``, ``predict_loader``,
``evaluate_loader``, on top of IRunner's loop (one stage named "train")."""

from __future__ import annotations

import os
import warnings
from collections.abc import Generator, Iterable, Mapping
from typing import Any

import torch

from ddprun.core import inference
from ddprun.core.callback import Callback, sort_callbacks
from ddprun.core.runner import IRunner, RunnerError
from ddprun.defaults import callback_class, has_callback, logger_class, with_logdir_loggers
from ddprun.engines.factory import default_engine, single_process_engine
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
        loaders: Mapping[str, Any] | None = None,
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
        fsdp: bool = False,
        fp16: bool = False,
        apex: bool = False,
        check: bool = False,
        overfit: bool = False,
        trial: Any = None,
    ) -> None:
        """Train `model` on `loaders` for `num_epochs` epochs (one stage, "train").

        Args:
            model: a module or a dict of modules.
            loaders: ordered dict of loaders; ``train*`` keys train, others evaluate.
            criterion, optimizer, scheduler: objects or dicts of them. A scheduler is stepped
                by a SchedulerCallback(mode="epoch") added when `callbacks` has none (a
                ReduceLROnPlateau on `valid_loader`/`valid_metric`).
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
            amp, ddp: pick AMPEngine / DistributedDataParallel(AMP)Engine when `engine` is None;
                under a launcher with WORLD_SIZE > 1 the DDP engine is chosen without `ddp`.
            fsdp: pick the FSDPEngine (sharded parameters, gradients and optimizer states);
                with `amp` its parameters compute in fp16 on CUDA, bf16 on CPU.
            fp16, apex: Catalyst's names for mixed precision: both mean `amp` (torch's native
                AMP; `apex` warns once that NVIDIA APEX is replaced by it).
            check: a short check run (CheckRunCallback: 3 batches per loader, 3 epochs).
            overfit: train on one batch per loader (BatchOverfitCallback).
            trial: an optuna trial, kept as `runner.trial` (its params are the hparams when
                none are given).

        `loaders=None` takes the loaders from `get_loaders(stage)`, for a subclass that
        overrides it.
        """
        if load_best_on_end and logdir is None:
            raise RunnerError("load_best_on_end=True needs a logdir to save the best checkpoint in")
        if num_epochs < 1:
            raise RunnerError(f"num_epochs must be >= 1, got {num_epochs}")
        if loaders is None and type(self).get_loaders is Runner.get_loaders:
            raise RunnerError("train() needs loaders=..., or a get_loaders(stage) override")
        if apex:
            warnings.warn(
                "ddprun: apex=True runs torch's native AMP (torch.autocast and GradScaler); "
                "NVIDIA APEX is not used",
                stacklevel=2,
            )
        amp = amp or fp16 or apex
        if logdir is not None and loaders is not None and valid_loader not in loaders:
            raise RunnerError(
                f"valid_loader={valid_loader!r} is not a loader key (have {list(loaders)}); "
                "pass valid_loader= naming the loader whose metric selects the best checkpoint"
            )
        self.model = model
        self.engine = engine if engine is not None else default_engine(amp=amp, ddp=ddp, fsdp=fsdp)
        self._loaders, self._num_epochs, self._seed = loaders, int(num_epochs), int(seed)
        self._criterion, self._optimizer, self._scheduler = criterion, optimizer, scheduler
        self.trial = trial
        if hparams is None and trial is not None:
            hparams = dict(getattr(trial, "params", {}) or {})
        self._hparams = dict(hparams or {})
        self._loggers = _default_loggers(loggers, logdir)
        callbacks = self._component_callbacks(sort_callbacks(callbacks))
        flags = (
            ("_check", "check", check),
            ("_overfit", "overfit", overfit),
            ("_verbose", "progress", verbose),
            ("_timer", "timer", timeit),
        )
        for key, role, wanted in flags:
            if wanted and not has_callback(callbacks, role):
                callbacks[key] = callback_class(role)()
        if scheduler is not None and not has_callback(callbacks, "scheduler"):
            # stepped every epoch (all of a dict); a ReduceLROnPlateau follows valid_metric
            callbacks["_scheduler"] = callback_class("scheduler")(
                loader_key=valid_loader, metric_key=valid_metric
            )
        checkpoint = callback_class("checkpoint")
        if logdir is not None and not has_callback(callbacks, "checkpoint"):
            callbacks["_checkpoint"] = checkpoint(
                logdir=logdir,
                loader_key=valid_loader,
                metric_key=valid_metric,
                minimize=minimize_valid_metric,
                resume=resume,
                load_on_stage_end="best" if load_best_on_end else None,
            )
        elif resume is not None and not has_callback(callbacks, "checkpoint"):
            callbacks["_resume"] = checkpoint(logdir=None, resume=resume)
        for callback in callbacks.values():  # the user's own CheckpointCallback honours them too
            if isinstance(callback, checkpoint):
                callback.apply_train_options(load_best_on_end, resume)
        self._callbacks = sort_callbacks(callbacks)
        self.run()

    def _component_callbacks(self, callbacks: dict[str, Callback]) -> dict[str, Callback]:
        """Callbacks `train` adds for the given components (SupervisedRunner adds criterion
        and optimizer callbacks); none here."""
        return callbacks

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
        gather: bool = False,
    ) -> Generator[Any, None, None]:
        """Yield `predict_batch(batch)` for every batch of `loader`: eval mode, no gradients,
        the batch moved to the device, the forward under the engine's autocast.

        The engine is `engine`, else the runner's, else a DeviceEngine (it becomes the
        runner's engine); `resume` first loads model weights from a checkpoint. Prediction runs
        in this process, with no process group: a DDP engine lends its device and precision to
        a one-process engine (see `ddprun.core.inference.inference_engine`), which is
        ``runner.engine`` while the generator runs. So after a spawn-mode DDP run the parent
        predicts with rank 0's weights on rank 0's device, and under a launcher every rank
        predicts the whole loader.

        Args:
            gather: with a DDP engine under a launcher, split the loader across ranks instead:
                the engine joins the process group (again, after ``train``), every rank takes
                rank 0's model state and predicts one contiguous block of the loader (no
                padding, no duplicates), and one gather at the loader's end hands rank 0 every
                prediction, on the CPU, in the loader's order; the group is left again before
                the first yield. Rank 0 yields them (batch boundaries follow the ranks' blocks:
                concatenated, they equal the one-process predictions); the other ranks yield
                nothing. Without a launcher or a DDP engine this process is rank 0 and
                predicts the whole loader.
        """
        self.engine = engine or self.engine or single_process_engine()
        model = model if model is not None else self.model
        if model is None:
            raise RunnerError("predict_loader needs a model: pass model= or train first")
        runner_engine = self.engine
        split = gather and inference.can_split(runner_engine)
        joined = inference.join_group(runner_engine) if split else False
        local = inference.inference_engine(runner_engine)
        if resume is not None:
            local.unpack_checkpoint(local.load_checkpoint(resume), model=model, source=str(resume))
        self.model = local.prepare_model(model)
        if split:
            inference.sync_from_rank0(runner_engine, self.model)
        set_global_seed(seed)
        _eval_mode(self.model)
        self.engine = local  # predict_batch may use runner.device / runner.engine
        try:
            if not split:
                for batch in loader:
                    yield self._predict_on(local, batch)
                return
            sharded = inference.split_loader(runner_engine, loader, seed)
            outputs = [inference.to_cpu(self._predict_on(local, b)) for b in sharded]
            outputs = inference.gather_in_order(runner_engine, outputs, local.device)
            if joined:
                runner_engine.teardown()
            yield from outputs or ()
        finally:
            self.engine = runner_engine

    def _predict_on(self, engine: Any, batch: Any) -> Any:
        # not around the yield: the caller's code keeps its grad mode and precision
        with torch.no_grad(), engine.autocast():
            return self.predict_batch(engine.move(batch))

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
        With a DDP engine under a launcher (also after ``train``) the engine joins the process
        group again and the ranks split the loader, as for a validation loader: every rank
        gets the exact metrics of the whole loader. In the parent of a spawn-mode DDP run the
        pass runs in-process, on rank 0's device (see `predict_loader`), so the `callbacks`
        given here see every batch; the runner's engine stays the DDP engine.
        """
        callbacks = sort_callbacks(callbacks)
        if has_callback(callbacks, "checkpoint"):
            raise RunnerError("evaluate_loader takes no CheckpointCallback (it trains nothing)")
        model = model if model is not None else self.model
        if model is None:
            raise RunnerError("evaluate_loader needs a model: pass model= or train first")
        engine = self.engine
        spawn_parent = engine is not None and engine.is_ddp and engine.needs_spawn()
        run_engine = inference.inference_engine(engine) if spawn_parent else engine
        try:
            self.train(
                model=self.engine.unwrap(model) if self.engine is not None else model,
                loaders={"valid": loader},
                criterion=self._criterion,
                engine=run_engine,
                callbacks=callbacks,
                loggers={},
                seed=seed,
                num_epochs=1,
                verbose=verbose,
            )
        finally:
            if spawn_parent:
                self.engine = engine
        return dict(self.loader_metrics)


def _default_loggers(loggers: Mapping[str, Any] | None, logdir: Any) -> dict[str, Any]:
    """`loggers` (a console logger when None) plus CSV and TensorBoard ones with a logdir."""
    given = dict(loggers) if loggers is not None else {"_console": logger_class("console")()}
    return with_logdir_loggers(given, logdir)


def _eval_mode(model: Any) -> None:
    for module in model.values() if isinstance(model, Mapping) else [model]:
        module.eval()
