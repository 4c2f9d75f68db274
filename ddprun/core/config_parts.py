"""The Config API's building blocks: config checks, loaders from datasets, optimizer param
groups, schedulers (used by `ddprun.core.config_runner`; decisions are documented there)."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ddprun.registry import REGISTRY, ConfigError, load_config

_ARGS = {
    "logdir", "seed", "verbose", "timeit", "check", "overfit", "resume", "amp", "fp16", "apex",
    "ddp", "valid_loader", "valid_metric", "minimize_valid_metric",
}  # fmt: skip
#: keys of Catalyst's ``catalyst-dl run`` arguments that mean nothing here: accepted, ignored
_CLI_ARGS = {
    "expdir", "autoresume", "distributed", "deterministic", "benchmark", "configs", "hydra",
    "name",
}  # fmt: skip
_STAGE_KEYS = ("num_epochs", "loaders", "criterion", "optimizer", "scheduler", "callbacks", "model")
#: stage keys whose top-level entry is the default of every stage without one
STAGE_DEFAULTS = ("loaders", "criterion", "optimizer", "scheduler", "callbacks")
_LOADER_ARGS = (
    "num_workers", "drop_last", "shuffle", "pin_memory", "collate_fn", "persistent_workers",
    "prefetch_factor", "timeout",
)  # fmt: skip
#: what a ``loaders`` entry built from datasets may hold
LOADER_KEYS = {
    "batch_size",
    "per_gpu_scaling",
    "loaders_params",
    "datasets",
    "samplers",
    *_LOADER_ARGS,
}
#: optimizer spec keys the runner reads (the rest go to the optimizer)
OPTIMIZER_META = ("_model", "layerwise_params", "no_bias_weight_decay", "lr_linear_scaling")


def read_config(config: Any) -> dict[str, Any]:
    """A copy of a config dict, or the config a YAML/JSON file holds."""
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict or a file path, got {type(config).__name__}")
    return _copy_tree(config)


def _copy_tree(value: Any) -> Any:
    """Copies of the mappings and lists, the leaves shared (datasets are not deep-copied)."""
    if isinstance(value, Mapping):
        return {key: _copy_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_tree(item) for item in value]
    return value


def check_stages(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stages of `config` (name -> dict), checked: keys known, ``num_epochs`` >= 1."""
    stages = config.get("stages")
    if not isinstance(stages, Mapping) or not stages:
        raise ConfigError("the config needs 'stages': a non-empty mapping of stage name -> stage")
    checked = {}
    for name, stage in stages.items():
        stage = {} if stage is None else stage
        if not isinstance(stage, Mapping):
            raise ConfigError(f"config stages.{name}: expected a mapping, got {stage!r}")
        unknown = sorted(set(stage) - set(_STAGE_KEYS))
        if unknown:
            raise ConfigError(
                f"config stages.{name}: unknown keys {unknown}; a stage takes {_STAGE_KEYS}"
            )
        epochs = stage.get("num_epochs", 1)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"config stages.{name}.num_epochs must be an int >= 1, got {epochs!r}"
            )
        checked[str(name)] = dict(stage)
    return checked


def check_args(args: Any) -> dict[str, Any]:
    """The ``args`` section, checked (Catalyst's CLI keys are accepted and ignored)."""
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"config args: expected a mapping, got {args!r}")
    unknown = sorted(set(args) - _ARGS - _CLI_ARGS)
    if unknown:
        raise ConfigError(f"config args: unknown keys {unknown}; expected some of {sorted(_ARGS)}")
    return dict(args)


def plain(spec: Any, where: str = "") -> dict[str, Any]:
    """`spec` as a dict without Catalyst's ``_key_value`` flag (a mapping without
    ``_target_`` is a dict of specs anyway)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"config {where}: expected a spec (a mapping with _target_), got {spec!r}"
        )
    return {key: value for key, value in spec.items() if key != "_key_value"}


def named(spec: Any, where: str) -> dict[str, Any]:
    """A mapping of name -> spec built into name -> object (None: empty)."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"config {where}: expected a mapping of name -> spec, got {spec!r}")
    return {key: REGISTRY.build(value, f"{where}.{key}") for key, value in spec.items()}


def model_from(spec: Any, where: str) -> Any:
    """The model a spec (or a mapping of specs) builds: a module or a dict of modules."""
    model = REGISTRY.build(plain(spec, where), where)
    parts = model.values() if isinstance(model, Mapping) else [model]
    if not parts or not all(isinstance(part, torch.nn.Module) for part in parts):
        raise ConfigError(f"config {where}: expected a module or a dict of modules, got {model!r}")
    return model


def select_models(model: Any, keys: Any, where: str) -> list[torch.nn.Module]:
    """The modules an optimizer trains: `model`, or the entries `keys` names of a dict."""
    if keys is None:
        if isinstance(model, Mapping):
            raise ConfigError(
                f"config {where}: the model is a dict ({list(model)}); name the model(s) this "
                "optimizer trains with _model: <key> (or a list of keys)"
            )
        return [model]
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not isinstance(model, Mapping) or any(key not in model for key in keys):
        have = list(model) if isinstance(model, Mapping) else "one module, not a dict"
        raise ConfigError(f"config {where}: _model {keys} is not in the model (have {have})")
    return [model[key] for key in keys]


def param_groups(
    modules: list[torch.nn.Module],
    layerwise: Mapping[str, Mapping[str, Any]],
    no_bias_weight_decay: bool = True,
    lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer param groups of `modules`' parameters (each once, in order).

    Args:
        layerwise: regex -> options (``lr``, ``weight_decay``, ...), matched against the
            parameter name from its start; later matches override earlier ones.
        no_bias_weight_decay: ``weight_decay=0`` for parameters whose name ends in ``bias``.
        lr_scale: multiplies every layer-wise ``lr``.

    Parameters with the same options share one group.
    """
    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            options: dict[str, Any] = {}
            for pattern, extra in layerwise.items():
                if re.match(pattern, name):
                    options.update(extra)
            if no_bias_weight_decay and name.endswith("bias"):
                options["weight_decay"] = 0.0
            if "lr" in options:
                options["lr"] = float(options["lr"]) * lr_scale
            key = repr(sorted(options.items()))
            groups.setdefault(key, {"params": [], **copy.deepcopy(options)})["params"].append(param)
    return list(groups.values())


def scheduler_from(optimizer: Any, spec: Any, where: str) -> Any:
    """The scheduler a spec builds for `optimizer` (its ``_optimizer`` entry for a dict)."""
    spec = plain(spec, where)
    key = spec.pop("_optimizer", None)
    if isinstance(optimizer, Mapping):
        if key not in optimizer:
            raise ConfigError(
                f"config {where}: the optimizer is a dict ({list(optimizer)}); name this "
                "scheduler's optimizer with _optimizer: <key>"
            )
        optimizer = optimizer[key]
    elif key is not None:
        raise ConfigError(f"config {where}: _optimizer {key!r} given, but there is one optimizer")
    return REGISTRY.build(spec, where, extra={"optimizer": optimizer})


def build_loaders(
    spec: dict[str, Any],
    where: str,
    datasets: Mapping[str, Any],
    samplers: Mapping[str, Any],
    world_size: int,
) -> dict[str, DataLoader]:
    """DataLoaders over `datasets` with the arguments of `spec` (see `ddprun.core.config_runner`)."""
    defaults = {key: spec[key] for key in _LOADER_ARGS if key in spec}
    defaults = REGISTRY.build(defaults, where)  # e.g. a collate_fn spec
    defaults.setdefault("pin_memory", torch.cuda.is_available())
    per_loader = spec.get("loaders_params") or {}
    extra = sorted(set(per_loader) - set(datasets))
    if extra:
        raise ConfigError(
            f"config {where}.loaders_params: no dataset named {extra} ({list(datasets)})"
        )
    batch_size, per_rank = spec.get("batch_size", 1), bool(spec.get("per_gpu_scaling", False))
    loaders = {}
    for name, source in datasets.items():
        kwargs = dict(defaults)
        sampler = None
        if isinstance(source, Mapping):
            source = dict(source)
            if "dataset" not in source:
                raise ConfigError(f"config {where}: dataset entry {name!r} has no 'dataset'")
            sampler = source.pop("sampler", None)
            kwargs.update(source)
            source = kwargs.pop("dataset")
        kwargs.update(REGISTRY.build(per_loader.get(name) or {}, f"{where}.loaders_params.{name}"))
        sampler = samplers.get(name, sampler)
        size = int(kwargs.pop("batch_size", batch_size))
        if not per_rank and world_size > 1:
            if size % world_size:
                raise ConfigError(
                    f"config {where}: batch_size {size} of loader {name!r} is the batch of all "
                    f"{world_size} ranks and must divide by it (or set per_gpu_scaling: true "
                    "for a batch_size per rank)"
                )
            size //= world_size
        if "batch_sampler" in kwargs:
            for key in ("shuffle", "drop_last"):
                kwargs.pop(key, None)
        else:
            kwargs["batch_size"] = size
            iterable = isinstance(source, IterableDataset)
            kwargs.setdefault(
                "shuffle", name.startswith("train") and sampler is None and not iterable
            )
            if sampler is not None:
                kwargs["sampler"] = sampler
        try:
            loaders[name] = DataLoader(source, **kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"config {where}: DataLoader of {name!r} refused its arguments: {error}"
            ) from error
    return loaders
