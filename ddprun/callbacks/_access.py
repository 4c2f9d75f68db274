"""Shared lookups for callbacks: batch keys and keyed components, with errors that say what is there."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


class BatchKeyError(KeyError):
    """A callback asked `runner.batch` for a key it does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def batch_value(runner: IRunner, key: str, owner: str) -> Any:
    """``runner.batch[key]`` or an error naming the key, the callback and the keys present."""
    batch = runner.batch
    if type(batch) is dict and key in batch:  # the per-batch case: no ABC isinstance check
        return batch[key]
    if not isinstance(batch, Mapping):
        raise BatchKeyError(
            f"{owner} reads runner.batch[{key!r}], but runner.batch is a {type(batch).__name__}; "
            "set self.batch = {...} (a dict) in handle_batch"
        )
    if key not in batch:
        raise BatchKeyError(
            f"{owner}: runner.batch has no key {key!r} (keys present: {sorted(batch)})"
        )
    return batch[key]


def select(component: Any, key: str | None, name: str, owner: str) -> Any:
    """The component itself, or its entry `key` when it is a dict; clear errors otherwise."""
    if component is None:
        raise ValueError(f"{owner} needs a {name}, but the runner has none for this stage")
    if key is None:
        return component
    if not isinstance(component, Mapping):
        raise ValueError(f"{owner}: {name}_key={key!r} given, but the {name} is not a dict")
    if key not in component:
        raise KeyError(f"{owner}: no {name} {key!r}; the {name} dict has {sorted(component)}")
    return component[key]


def entries(component: Any) -> dict[str | None, Any]:
    """A dict view: ``{None: component}`` for a single object, the dict itself otherwise."""
    if isinstance(component, Mapping):
        return dict(component)
    return {None: component}


class SkippedLoaderMetrics(dict):
    """The epoch metrics of a loader that did not run this epoch (PeriodicLoaderCallback puts
    its selection metric there at the worst value, as Catalyst 21.12 does): `epoch_metric`
    gives NaN for its other keys, which checkpoint ranking treats as the worst score, and
    `loader_skipped` tells early stopping and plateau schedulers not to count the epoch."""

    loader_skipped = True


def loader_skipped(runner: IRunner, loader_key: str) -> bool:
    """Whether `loader_key` was skipped this epoch (see `SkippedLoaderMetrics`)."""
    return getattr(runner.epoch_metrics.get(loader_key), "loader_skipped", False)


def epoch_metric(runner: IRunner, loader_key: str, metric_key: str, owner: str) -> float:
    """``runner.epoch_metrics[loader_key][metric_key]`` with an error listing what exists
    (NaN for a key a skipped loader lacks, see `SkippedLoaderMetrics`)."""
    loader_metrics = runner.epoch_metrics.get(loader_key)
    if getattr(loader_metrics, "loader_skipped", False) and metric_key not in loader_metrics:
        return math.nan
    if loader_metrics is None:
        raise KeyError(
            f"{owner}: no metrics for loader {loader_key!r} this epoch "
            f"(loaders: {sorted(runner.epoch_metrics)})"
        )
    if metric_key not in loader_metrics:
        raise KeyError(
            f"{owner}: loader {loader_key!r} has no metric {metric_key!r} "
            f"(available: {sorted(loader_metrics)})"
        )
    return float(loader_metrics[metric_key])
