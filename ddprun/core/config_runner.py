"""ConfigRunner and SupervisedConfigRunner: every stage built from a config (the Config API).

A config is a dict, or the path of a ``.yml``/``.yaml``/``.json`` file (`load_config`)::

    args:     logdir, seed (42), verbose, timeit, check, overfit, resume, amp/fp16/apex/ddp,
              valid_loader ("valid"), valid_metric ("loss"), minimize_valid_metric (True)
    runner:   {_target_: RunnerClass, **its kwargs}, read by `ConfigRunner.from_config`
    engine:   a spec; absent: the engine follows the launch (DDP under ``ddprun --nproc N``)
    model:    a spec, or a mapping of specs (a dict of models)
    loggers:  {name: spec}
    stages:   {stage: {num_epochs, loaders, criterion, optimizer, scheduler, callbacks, model}}

``_target_`` names come from `ddprun.registry.REGISTRY`. Decisions where Catalyst 21.12 was
silent or defective:

- **Defaults per stage.** ``loaders``, ``criterion``, ``optimizer``, ``scheduler`` and
  ``callbacks`` at the top level are the default of every stage that has no entry of that name
  (the stage's entry replaces it whole). Unknown keys in a stage are an error (a typo would drop
  a component silently); other top-level sections are left alone (YAML anchors live there).
- **The model across stages.** The first stage builds the top-level ``model``; a later stage
  keeps ``runner.model``, the previous stage's trained module (the same object, unwrapped), so
  weights carry over in one process and on every rank alike; a stage with its own ``model``
  entry builds a new one (load weights into it with ``CheckpointCallback(load_on_stage_start=
  ...)``). Override `get_model` (calling ``super()``) to freeze or swap parts per stage.
- **Loaders.** Either every entry of ``loaders`` is a spec (DataLoaders used as they are), or
  ``loaders`` holds DataLoader arguments and the datasets come from `get_datasets` (default:
  ``loaders.datasets``). As in Catalyst, ``batch_size`` is the batch of the whole world: each of
  N ranks loads ``batch_size / N`` (``per_gpu_scaling: true``: ``batch_size`` per rank), so a
  config trains the same under any world size; ``train*`` loaders shuffle unless ``shuffle`` or
  a sampler says otherwise (a ``shuffle`` given by the config wins, unlike Catalyst). The DDP
  engine shards the loaders; no DistributedSampler is added here.
- **Optimizers** take the model's parameters (``_model: key`` or a list of keys for a dict
  model), with Catalyst's ``layerwise_params``, ``no_bias_weight_decay`` (default true: biases
  get ``weight_decay=0``) and ``lr_linear_scaling``; parameters sharing options share one
  param group (Catalyst made a group per parameter, which defeats multi-tensor steps).
- **Callbacks added** when the config has none of the kind: a SchedulerCallback for a scheduler
  (on ``valid_loader``/``valid_metric`` when the stage has that loader), and with
  ``args.logdir`` a CheckpointCallback and CSV/TensorBoard loggers (as `Runner.train` does;
  Catalyst left a scheduler without a callback unstepped). `SupervisedConfigRunner` adds the
  criterion and optimizer callbacks as `SupervisedRunner.train` does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ddprun.core.config_parts import (
    LOADER_KEYS,
    OPTIMIZER_META,
    STAGE_DEFAULTS,
    build_loaders,
    check_args,
    check_stages,
    model_from,
    named,
    param_groups,
    plain,
    read_config,
    scheduler_from,
    select_models,
)
from ddprun.core.runner import IRunner, RunnerError
from ddprun.core.supervised import Keys, SupervisedRunner
from ddprun.defaults import callback_class, has_callback, logger_class, with_logdir_loggers
from ddprun.engines.factory import default_engine
from ddprun.registry import REGISTRY, TARGET, ConfigError

__all__ = ["ConfigRunner", "SupervisedConfigRunner"]


class ConfigRunner(IRunner):
    """A runner whose stages, components, loaders, callbacks, engine and loggers come from
    `config` (see the module docstring). Write `handle_batch` (or use SupervisedConfigRunner).

    Args:
        config: the config dict (copied; its leaves, e.g. dataset objects, are shared), or the
            path of a YAML/JSON file.
    """

    def __init__(self, config: Mapping[str, Any] | str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # cooperative: SupervisedConfigRunner's keys go on
        self._config = read_config(config)
        self._stage_config = check_stages(self._config)
        self._args = check_args(self._config.get("args"))
        self._seed = int(self._args.get("seed", 42))
        logdir = self._args.get("logdir")
        self._logdir = None if logdir is None or str(logdir).lower() == "none" else str(logdir)
        if self._args.get("apex"):
            warnings.warn(
                "ddprun: args.apex runs torch's native AMP (torch.autocast and GradScaler); "
                "NVIDIA APEX is not used",
                stacklevel=2,
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> ConfigRunner:
        """The runner the config's ``runner`` section names (``_target_``, a ConfigRunner
        subclass, with the section's other keys as arguments); without one, `cls`."""
        config = read_config(config)
        spec = dict(config.get("runner") or {})
        target = spec.pop(TARGET, None)
        runner_cls = REGISTRY.get(target, "runner") if target is not None else cls
        if not (isinstance(runner_cls, type) and issubclass(runner_cls, ConfigRunner)):
            raise ConfigError(f"config runner: {target!r} is not a ConfigRunner subclass")
        return runner_cls(config=config, **REGISTRY.build(spec, "runner"))

    # --------------------------------------------------------------- the run
    @property
    def stages(self) -> list[str]:
        """The config's stage names, in order."""
        return list(self._stage_config)

    @property
    def seed(self) -> int:
        """``args.seed`` (42)."""
        return self._seed

    @property
    def hparams(self) -> dict[str, Any]:
        """The whole config (loggers write it as the run's hyper-parameters)."""
        return dict(self._config)

    @property
    def logdir(self) -> str | None:
        """``args.logdir`` (None when absent or ``"none"``)."""
        return self._logdir

    def get_stage_len(self, stage: str) -> int:
        """``num_epochs`` of the stage (1)."""
        return int(self._stage_config[stage].get("num_epochs", 1))

    def get_engine(self) -> Any:
        """The ``engine`` spec, else the engine the launch and ``args.amp``/``ddp`` call for."""
        spec = self._config.get("engine")
        if spec is not None:
            return REGISTRY.build(spec, "engine")
        amp = any(bool(self._args.get(key)) for key in ("amp", "fp16", "apex"))
        return default_engine(amp=amp, ddp=bool(self._args.get("ddp")))

    def get_loggers(self) -> dict[str, Any]:
        """``loggers``, plus a console logger when none is given, and CSV and TensorBoard
        loggers with ``args.logdir`` (each only if none of its kind is given)."""
        loggers = named(self._config.get("loggers"), "loggers")
        console = logger_class("console")
        if not any(isinstance(logger, console) for logger in loggers.values()):
            loggers["_console"] = console()
        return with_logdir_loggers(loggers, self._logdir)

    # --------------------------------------------------------------- data
    def get_datasets(self, stage: str) -> dict[str, Any]:
        """Datasets of `stage` by loader name (``loaders.datasets``); an entry may also be a
        dict with ``dataset``, an optional ``sampler`` and DataLoader arguments."""
        spec = self._loaders_spec(stage).get("datasets")
        if spec is None:
            raise ConfigError(
                f"config stages.{stage}.loaders has no 'datasets': give them there or override "
                "get_datasets(stage) in your runner"
            )
        return named(spec, f"stages.{stage}.loaders.datasets")

    def get_samplers(self, stage: str) -> dict[str, Any]:
        """Samplers of `stage` by loader name (``loaders.samplers``; none by default)."""
        return named(self._loaders_spec(stage).get("samplers"), f"stages.{stage}.loaders.samplers")

    def get_loaders(self, stage: str) -> dict[str, Any]:
        """The stage's loaders, from loader specs or from `get_datasets` (module docstring)."""
        spec, where = self._loaders_spec(stage), f"stages.{stage}.loaders"
        if spec and all(isinstance(v, Mapping) and TARGET in v for v in spec.values()):
            return dict(REGISTRY.build(spec, where))
        unknown = sorted(set(spec) - LOADER_KEYS)
        if unknown:
            raise ConfigError(
                f"config {where}: unknown keys {unknown}; expected DataLoader arguments "
                f"{sorted(LOADER_KEYS)}, or only loader specs (each with a _target_)"
            )
        datasets = self.get_datasets(stage=stage)
        samplers = self.get_samplers(stage=stage)
        return build_loaders(spec, where, datasets, samplers, self._world_size())

    def _loaders_spec(self, stage: str) -> dict[str, Any]:
        spec = self._stage_value(stage, "loaders")
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"config stages.{stage}.loaders: expected a mapping (DataLoader arguments and "
                f"datasets, or loader specs), got {spec!r}; or override get_loaders(stage)"
            )
        return dict(spec)

    # ------------------------------------------------------------- components
    def get_model(self, stage: str) -> Any:
        """The stage's own ``model``; else, after the first stage, the previous stage's model
        (`runner.model`); else a new model from the latest ``model`` entry up to `stage` (the
        top-level one at the first stage; so a spawn-mode parent rebuilds the architecture)."""
        stages = self.stages
        if "model" in self._stage_config[stage]:
            return model_from(self._stage_config[stage]["model"], f"stages.{stage}.model")
        if stage != stages[0] and self.model is not None:
            return self.model
        for name in reversed(stages[: stages.index(stage)]):
            if "model" in self._stage_config[name]:
                return model_from(self._stage_config[name]["model"], f"stages.{name}.model")
        if self._config.get("model") is not None:
            return model_from(self._config["model"], "model")
        if self.model is not None:
            return self.model
        raise ConfigError("the config has no 'model' (a spec with _target_, or a dict of them)")

    def get_criterion(self, stage: str) -> Any:
        """The stage's ``criterion`` (one spec, or a dict of them), or None."""
        spec, where = self._stage_value(stage, "criterion"), f"stages.{stage}.criterion"
        return None if spec is None else REGISTRY.build(plain(spec, where), where)

    def get_optimizer(self, stage: str, model: Any) -> Any:
        """The stage's ``optimizer`` (one spec, or a dict of them) over `model`'s parameters."""
        spec, where = self._stage_value(stage, "optimizer"), f"stages.{stage}.optimizer"
        if spec is None:
            return None
        spec = plain(spec, where)
        if TARGET in spec:
            return self._build_optimizer(stage, model, spec, where)
        return {k: self._build_optimizer(stage, model, v, f"{where}.{k}") for k, v in spec.items()}

    def _build_optimizer(
        self, stage: str, model: Any, spec: Any, where: str
    ) -> torch.optim.Optimizer:
        spec = plain(spec, where)
        options = {key: spec.pop(key) for key in OPTIMIZER_META if key in spec}
        scaling, lr_scale = options.get("lr_linear_scaling"), 1.0
        if scaling:
            base = dict(scaling)
            loaders = self._loaders_spec(stage)
            batch = int(loaders.get("batch_size", 1))
            batch *= self._world_size() if loaders.get("per_gpu_scaling") else 1
            lr_scale = batch / float(base.get("base_batch_size", 256))
            spec["lr"] = float(base["lr"]) * lr_scale
        groups = param_groups(
            select_models(model, options.get("_model"), where),
            layerwise=options.get("layerwise_params") or {},
            no_bias_weight_decay=bool(options.get("no_bias_weight_decay", True)),
            lr_scale=lr_scale,
        )
        return REGISTRY.build(spec, where, extra={"params": groups})

    def get_scheduler(self, stage: str, optimizer: Any) -> Any:
        """The stage's ``scheduler`` (one spec, or a dict of them; ``_optimizer: key`` picks
        the optimizer of a dict), or None."""
        spec, where = self._stage_value(stage, "scheduler"), f"stages.{stage}.scheduler"
        if spec is None:
            return None
        if optimizer is None:
            raise ConfigError(f"config {where}: a scheduler needs an optimizer; the stage has none")
        spec = plain(spec, where)
        if TARGET in spec:
            return scheduler_from(optimizer, spec, where)
        return {k: scheduler_from(optimizer, v, f"{where}.{k}") for k, v in spec.items()}

    def get_callbacks(self, stage: str) -> dict[str, Any]:
        """The stage's ``callbacks`` plus those the args and components call for."""
        callbacks = named(self._stage_value(stage, "callbacks"), f"stages.{stage}.callbacks")
        args = self._args
        valid_loader = args.get("valid_loader", "valid")
        valid_metric = args.get("valid_metric", "loss")
        selects = valid_loader in self.loaders  # the stage has the loader that selects
        flags = (
            ("verbose", "_verbose", "progress"),
            ("timeit", "_timer", "timer"),
            ("check", "_check", "check"),
            ("overfit", "_overfit", "overfit"),
        )
        for flag, key, role in flags:
            if args.get(flag) and not has_callback(callbacks, role):
                callbacks[key] = callback_class(role)()
        if self.scheduler is not None and not has_callback(callbacks, "scheduler"):
            callbacks["_scheduler"] = callback_class("scheduler")(
                loader_key=valid_loader if selects else None,
                metric_key=valid_metric if selects else None,
            )
        checkpoint = callback_class("checkpoint")
        if self._logdir is not None and not has_callback(callbacks, "checkpoint"):
            callbacks["_checkpoint"] = checkpoint(
                logdir=self._logdir,
                loader_key=valid_loader if selects else None,
                metric_key=valid_metric if selects else None,
                minimize=bool(args.get("minimize_valid_metric", True)),
            )
        for callback in callbacks.values():
            if isinstance(callback, checkpoint):
                callback.apply_train_options(False, args.get("resume"))
        return self._add_component_callbacks(callbacks)

    def _add_component_callbacks(self, callbacks: dict[str, Any]) -> dict[str, Any]:
        """Callbacks the stage's components call for (SupervisedConfigRunner: criterion and
        optimizer); none here."""
        return callbacks

    # ----------------------------------------------------------------- helpers
    def _stage_value(self, stage: str, key: str) -> Any:
        if key in self._stage_config[stage]:
            return self._stage_config[stage][key]
        return self._config.get(key) if key in STAGE_DEFAULTS else None

    def _world_size(self) -> int:
        return max(int(getattr(self.engine, "world_size", 1) or 1), 1)


class SupervisedConfigRunner(ConfigRunner, SupervisedRunner):
    """A `SupervisedRunner` built from a config: ``model(batch[input_key]) ->
    batch[output_key]``; adds a CriterionCallback and an OptimizerCallback for the stage's
    criterion and optimizer when the config gives none of that kind.

    Args:
        config: as for `ConfigRunner`.
        input_key, output_key, target_key, loss_key: as for `SupervisedRunner`.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike | None = None,
        input_key: Keys = "features",
        output_key: Keys = "logits",
        target_key: str = "targets",
        loss_key: str = "loss",
    ) -> None:
        if config is None:
            raise ConfigError("SupervisedConfigRunner needs config= (a dict or a file path)")
        super().__init__(
            config=config,
            input_key=input_key,
            output_key=output_key,
            target_key=target_key,
            loss_key=loss_key,
        )

    def _add_component_callbacks(self, callbacks: dict[str, Any]) -> dict[str, Any]:
        self._criterion, self._optimizer = self.criterion, self.optimizer
        return self._component_callbacks(callbacks)

    def train(self, **kwargs: Any) -> None:
        """Not for a config runner: its config gives loaders, components and epochs."""
        raise RunnerError(
            f"{type(self).__name__} takes its loaders, components and epochs from its config: "
            "call run() (train() and evaluate_loader() belong to dl.SupervisedRunner)"
        )
