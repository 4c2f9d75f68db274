"""Callbacks: the event names, their order and node, and per-event dispatch lists.

The loop fires these events (see `Event`), each taking the runner::

    experiment_start
      for stage in runner.stages:
        stage_start
          for epoch in 1..stage_epoch_len:
            epoch_start
              for loader_key, loader in runner.loaders.items():
                loader_start
                  for batch in loader:
                    batch_start -> handle_batch(batch) -> batch_end
                loader_end
            epoch_end
        stage_end
    experiment_end
    exception            (on any error, then the error is re-raised)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


class Event(str, Enum):
    """Every event of the run, named after the callback method that receives it."""

    EXPERIMENT_START = "on_experiment_start"
    STAGE_START = "on_stage_start"
    EPOCH_START = "on_epoch_start"
    LOADER_START = "on_loader_start"
    BATCH_START = "on_batch_start"
    BATCH_END = "on_batch_end"
    LOADER_END = "on_loader_end"
    EPOCH_END = "on_epoch_end"
    STAGE_END = "on_stage_end"
    EXPERIMENT_END = "on_experiment_end"
    EXCEPTION = "on_exception"


class CallbackOrder(IntEnum):
    """Where a callback runs among the others: lower first, ties keep insertion order."""

    Internal = 0
    Metric = 20
    MetricAggregation = 40
    Optimizer = 60
    Scheduler = 80
    External = 100
    ExternalExtra = 120
    # lower_snake_case aliases, as Catalyst users write them
    internal = 0
    metric = 20
    metric_aggregation = 40
    optimizer = 60
    scheduler = 80
    external = 100
    external_extra = 120


class CallbackNode(IntEnum):
    """Which ranks run a callback: all of them, rank 0 only, or every rank but 0."""

    all = 0
    master = 1
    worker = 2


class EventHooks:
    """One no-op method per event (`Event`): what callbacks and the runner itself override.
    The loop calls only the methods a class overrides."""

    def on_experiment_start(self, runner: IRunner) -> None:
        """Called once, on the first stage's callbacks, right after they are built."""

    def on_stage_start(self, runner: IRunner) -> None:
        """Called after the stage's components are built and prepared by the engine."""

    def on_epoch_start(self, runner: IRunner) -> None:
        """Called at the start of every epoch."""

    def on_loader_start(self, runner: IRunner) -> None:
        """Called before the first batch of each loader."""

    def on_batch_start(self, runner: IRunner) -> None:
        """Called before `handle_batch`, with `runner.batch` on the device."""

    def on_batch_end(self, runner: IRunner) -> None:
        """Called after `handle_batch` filled `runner.batch`."""

    def on_loader_end(self, runner: IRunner) -> None:
        """Called after the last batch; metrics are synced across ranks at this point."""

    def on_epoch_end(self, runner: IRunner) -> None:
        """Called after every loader of the epoch ran; `runner.epoch_metrics` is complete."""

    def on_stage_end(self, runner: IRunner) -> None:
        """Called after the last epoch of the stage."""

    def on_experiment_end(self, runner: IRunner) -> None:
        """Called once, after the last stage (not on errors: those get `on_exception`)."""

    def on_exception(self, runner: IRunner) -> None:
        """Called when the run raised; `runner.exception` holds the error."""


class Callback(EventHooks):
    """Base class of callbacks: the event methods of `EventHooks`; subclasses override what
    they need.

    Args:
        order: position among callbacks (`CallbackOrder`); lower runs first.
        node: which ranks keep this callback (`CallbackNode`).
    """

    def __init__(self, order: int, node: int = CallbackNode.all) -> None:
        self.order = int(order)
        self.node = CallbackNode(node)

    def handles(self, event: Event) -> bool:
        """Whether the runner calls this callback at `event` (asked once per stage, when it
        builds its dispatch lists): by default when the class overrides that method. A
        callback whose method has nothing to do under its settings says False there and costs
        no call per batch."""
        return _overrides(self, event)


def _overrides(callback: Callback, event: Event) -> bool:
    method = getattr(type(callback), event.value, None)
    return method is not None and method is not getattr(Callback, event.value)


def keep_for_rank(callback: Callback, rank: int) -> bool:
    """Whether `callback` runs on `rank` (-1 = not distributed) according to its node."""
    node = getattr(callback, "node", CallbackNode.all)
    if node == CallbackNode.master:
        return rank <= 0
    if node == CallbackNode.worker:
        return rank > 0
    return True


def sort_callbacks(callbacks: Mapping[str, Any] | Iterable[Any] | None) -> dict[str, Callback]:
    """Validate callbacks and sort them by order (stable), as a dict.

    A list gets its indices as keys. Raises TypeError for anything that is not a Callback,
    naming its key, so a wrong object fails when the stage starts, not when an event fires.
    """
    if callbacks is None:
        return {}
    items = (
        list(callbacks.items())
        if isinstance(callbacks, Mapping)
        else [(str(i), c) for i, c in enumerate(callbacks)]
    )
    for key, callback in items:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callback {key!r} is a {type(callback).__name__}, expected a ddprun.dl.Callback"
            )
    return dict(sorted(items, key=lambda kv: kv[1].order))


def build_dispatch(callbacks: Mapping[str, Callback]) -> dict[Event, list[Callback]]:
    """For each event, the callbacks (already sorted) that override its method.

    Built once per stage so that firing an event never calls a no-op.
    """
    return {event: [cb for cb in callbacks.values() if _handles(cb, event)] for event in Event}


def _handles(callback: Any, event: Event) -> bool:
    handles = getattr(callback, "handles", None)
    return handles(event) if handles is not None else _overrides(callback, event)
