"""Callbacks that change ``runner.loaders`` for an epoch: `PeriodicLoaderCallback` (run a loader
every n-th epoch) and `BatchOverfitCallback` (the same few batches every epoch).

The loop reads ``runner.loaders`` after the ``on_epoch_start`` callbacks; both callbacks put the
stage's loaders back at epoch end, each undoing only its own change, so they compose. Their
decisions depend only on the epoch and the loader key, so every DDP rank takes the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from ddprun.callbacks._access import SkippedLoaderMetrics
from ddprun.callbacks.control import whole_number
from ddprun.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


# ------------------------------------------------------------ periodic loaders
class PeriodicLoaderCallback(Callback):
    """Run each named loader only every `period`-th epoch of the stage (0: never).

    Args:
        valid_loader_key: the loader whose metric selects checkpoints.
        valid_metric_key: that metric.
        minimize: whether lower is better for it.
        **loader_periods: ``loader_key=period``; loaders not named run every epoch.

    At epoch start ``runner.loaders`` becomes the epoch's loaders (the loop reads it after
    ``on_epoch_start``); at epoch end the stage's loaders come back. In an epoch without the
    valid loader, ``epoch_metrics[valid_loader_key]`` holds ``{valid_metric_key: worst}``
    (+inf when minimizing, as in Catalyst 21.12), so CheckpointCallback never ranks that epoch
    best (other keys read as NaN there, also the worst); EarlyStoppingCallback and a
    ReduceLROnPlateau SchedulerCallback do not count it. Note that loggers get that value too.
    Named loaders that the stage lacks, a valid loader with period 0 and an epoch without any
    loader are errors at stage start.
    """

    def __init__(
        self,
        valid_loader_key: str,
        valid_metric_key: str,
        minimize: bool = True,
        **loader_periods: int,
    ) -> None:
        super().__init__(order=CallbackOrder.Internal)
        self.valid_loader_key, self.valid_metric_key = valid_loader_key, valid_metric_key
        self.minimize = bool(minimize)
        self.periods = {
            k: whole_number(p, f"period of {k!r}", 0) for k, p in loader_periods.items()
        }
        if self.periods.get(valid_loader_key, 1) == 0:
            raise ValueError(
                f"the valid loader {valid_loader_key!r} needs a period >= 1, got 0 "
                "(it selects checkpoints)"
            )
        self._stage_loaders: dict[str, Any] | None = None

    def runs(self, loader_key: str, epoch: int) -> bool:
        """Whether `loader_key` runs in `epoch` (1-based, within the stage)."""
        period = self.periods.get(loader_key, 1)
        return period > 0 and epoch % period == 0

    def on_stage_start(self, runner: IRunner) -> None:
        keys = list(runner.loaders)
        unknown = sorted(set(self.periods) - set(keys))
        if unknown:
            raise ValueError(
                f"PeriodicLoaderCallback: no loader {unknown} in stage {runner.stage_key!r} "
                f"(loaders: {keys})"
            )
        if self.valid_loader_key not in keys:
            raise ValueError(
                f"PeriodicLoaderCallback: valid_loader_key={self.valid_loader_key!r} is not a "
                f"loader of stage {runner.stage_key!r} (loaders: {keys})"
            )
        # a loader that runs in epoch 1 has period 1 and runs in every epoch; without one,
        # epoch 1 would have no loader at all
        if not any(self.runs(key, 1) for key in keys):
            raise ValueError(
                f"PeriodicLoaderCallback: no loader runs in epoch 1 of stage {runner.stage_key!r} "
                f"(periods: {self.periods}); give one loader period 1, or leave it out"
            )

    def on_epoch_start(self, runner: IRunner) -> None:
        self._stage_loaders = dict(runner.loaders)
        epoch = runner.stage_epoch_step
        runner.loaders = {k: v for k, v in runner.loaders.items() if self.runs(k, epoch)}

    def on_epoch_end(self, runner: IRunner) -> None:
        if self.valid_loader_key not in runner.loaders:
            worst = math.inf if self.minimize else -math.inf
            runner.epoch_metrics[self.valid_loader_key] = SkippedLoaderMetrics(
                {self.valid_metric_key: worst}
            )
        self._restore(runner)

    def on_stage_end(self, runner: IRunner) -> None:
        self._restore(runner)

    def on_exception(self, runner: IRunner) -> None:
        self._restore(runner)

    def _restore(self, runner: IRunner) -> None:
        # by key: a loader another callback replaced during the epoch keeps its replacement
        if self._stage_loaders is not None:
            current = runner.loaders
            runner.loaders = {k: current.get(k, v) for k, v in self._stage_loaders.items()}
            self._stage_loaders = None


# ---------------------------------------------------------------- batch overfit
class BatchOverfitCallback(Callback):
    """Each epoch, run every loader on its first batches only, the same ones every epoch.

    Args:
        **loader_batches: ``loader_key=n`` (an int >= 1: batches) or ``loader_key=f`` (a
            float in (0, 1]: that fraction of the loader's batches, at least 1); loaders not
            named get 1 batch.

    The batches are drawn from the loader once per stage (on each rank: its own shard; a
    training loader has the same number of batches on every rank, so the counts stay equal)
    and replayed every epoch with their tensors copied, so a `handle_batch` that changes them
    in place does not change the next epoch's. ``runner.loaders`` holds the limited loaders
    during the epoch and the originals again after it. A fraction needs a loader with a
    length; named loaders that the stage lacks are an error at stage start.
    """

    def __init__(self, **loader_batches: int | float) -> None:
        super().__init__(order=CallbackOrder.Internal)
        self.loader_batches: dict[str, int | float] = {}
        for key, amount in loader_batches.items():
            if isinstance(amount, float):  # as in Catalyst: a float is a fraction (1.0: all)
                if not 0 < amount <= 1:
                    raise ValueError(
                        f"BatchOverfitCallback: {key}={amount} must be a number of batches "
                        ">= 1 or a fraction in (0, 1]"
                    )
                self.loader_batches[key] = amount
            else:
                self.loader_batches[key] = whole_number(amount, f"BatchOverfitCallback: {key}", 1)
        self._limited: dict[str, _FirstBatches] = {}

    def on_stage_start(self, runner: IRunner) -> None:
        unknown = sorted(set(self.loader_batches) - set(runner.loaders))
        if unknown:
            raise ValueError(
                f"BatchOverfitCallback: no loader {unknown} in stage {runner.stage_key!r} "
                f"(loaders: {list(runner.loaders)})"
            )
        self._limited = {}

    def on_epoch_start(self, runner: IRunner) -> None:
        limited = {}
        for key, loader in runner.loaders.items():
            if not isinstance(loader, _FirstBatches):
                wrapper = self._limited.get(key)
                if wrapper is None or wrapper.origin is not loader:
                    wrapper = _FirstBatches(loader, self._count(key, loader))
                    self._limited[key] = wrapper
                loader = wrapper
            limited[key] = loader
        runner.loaders = limited

    def on_epoch_end(self, runner: IRunner) -> None:
        self._unwrap(runner)

    def on_stage_end(self, runner: IRunner) -> None:
        self._unwrap(runner)
        self._limited = {}  # frees the kept batches

    def on_exception(self, runner: IRunner) -> None:
        self._unwrap(runner)

    def _count(self, key: str, loader: Any) -> int:
        amount = self.loader_batches.get(key, 1)
        if isinstance(amount, int):
            return amount
        try:
            length = len(loader)
        except TypeError:
            raise ValueError(
                f"BatchOverfitCallback: {key}={amount} is a fraction, but loader {key!r} has "
                "no length; give a number of batches"
            ) from None
        return max(1, int(length * amount))

    def _unwrap(self, runner: IRunner) -> None:
        runner.loaders = {
            k: v.origin if isinstance(v, _FirstBatches) else v for k, v in runner.loaders.items()
        }


class _FirstBatches:
    """The first `count` batches of `origin`, drawn at the first iteration and replayed."""

    def __init__(self, origin: Any, count: int) -> None:
        self.origin, self.count = origin, count
        self.batch_size = getattr(origin, "batch_size", None)
        self.dataset = getattr(origin, "dataset", None)
        self._batches: list[Any] | None = None

    def __len__(self) -> int:
        if self._batches is not None:
            return len(self._batches)
        return min(self.count, len(self.origin))  # TypeError without a length: none known

    def __iter__(self) -> Iterator[Any]:
        if self._batches is None:
            self._batches = list(islice(iter(self.origin), self.count))
        return (_copied(batch) for batch in self._batches)


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_copied(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value
