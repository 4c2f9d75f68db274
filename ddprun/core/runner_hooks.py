"""The runner is a callback: its own ``on_*`` methods run at their events.

A `Runner`/`IRunner` subclass may define any callback method (``on_loader_start`` ...
``on_exception``), as Catalyst users write them: create meters in ``on_loader_start``, update
them in ``handle_batch``, write ``loader_metrics`` in ``on_loader_end``. Order at each event,
as in Catalyst 21.12: for ``*_start`` events the runner's method runs after the runner's own
bookkeeping (counters, loader state) and before the callbacks; for ``*_end`` events and
``on_exception`` after the callbacks and before the bookkeeping that follows them (logging,
``epoch_metrics``). ``on_loader_end`` runs inside the loader-end metric sync, where the
averages of ``batch_metrics`` are already in ``loader_metrics`` (as Catalyst's CriterionCallback
puts the loss there before the runner's own handler runs), so metrics the
runner holds as attributes (directly, or in a dict, list or tuple attribute) when the loader
starts are synced across ranks with everything else and give exact values there.

Every method here is a no-op, so ``super().on_loader_start(runner)`` works, and the loop calls
only the methods a subclass overrides: a runner that defines none costs nothing per event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ddprun.core.callback import Event, EventHooks
from ddprun.metrics import Metric
from ddprun.metrics.torchmetrics_adapter import adapt_torchmetric

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

#: Events where the runner's method runs before the callbacks (the others: after them).
_STARTS = frozenset(
    {
        Event.EXPERIMENT_START,
        Event.STAGE_START,
        Event.EPOCH_START,
        Event.LOADER_START,
        Event.BATCH_START,
    }
)


class RunnerHooks(EventHooks):
    """Callback methods of the runner itself (`EventHooks`: no-ops; override any of them, in
    the order the module docstring gives)."""


def with_runner_hooks(runner: IRunner, bound: dict[Event, list[Any]]) -> dict[Event, list[Any]]:
    """`bound` (each event's callback methods, in order) with the runner's own overridden
    methods placed first for ``*_start`` events and last for the others."""
    result = {}
    for event, methods in bound.items():
        if not overrides(runner, event):
            result[event] = methods
            continue
        hook = getattr(runner, event.value)
        result[event] = [hook, *methods] if event in _STARTS else [*methods, hook]
    return result


def overrides(runner: IRunner, event: Event) -> bool:
    """Whether `runner`'s class defines its own method for `event`."""
    own = getattr(type(runner), event.value, None)
    return own is not None and own is not getattr(RunnerHooks, event.value)


# the runner's own state: loaders, batches, callbacks, loggers and metric values, never meters
# (and reading batch_metrics' values would compute its deferred ones)
RUNNER_STATE = frozenset(
    {"engine", "loaders", "loader", "callbacks", "loggers", "batch", "batch_metrics",
     "loader_metrics", "epoch_metrics", "loader_sync", "resumed_checkpoint", "exception"}
)  # fmt: skip


def metrics_held_by(runner: IRunner) -> list[Metric]:
    """Metrics among the runner's public attributes (directly, or as values of a dict, list or
    tuple attribute), in attribute order: the same on every rank running the same code. A bare
    ``torchmetrics.Metric`` counts too, through its `TorchMetric` adapter. The runner's own state
    (`RUNNER_STATE`: loaders, batches, callbacks, ...) is not searched."""
    found: list[Metric] = []
    for name, value in vars(runner).items():
        if name.startswith("_") or name in RUNNER_STATE:
            continue
        items = value.values() if isinstance(value, Mapping) else value
        if not isinstance(value, (Mapping, list, tuple)):
            items = [value]
        for item in items:
            # a bare torchmetrics metric joins through its adapter (its own sync turned off)
            item = adapt_torchmetric(item) or item
            if Metric in type(item).__mro__:  # isinstance without the ABC's subclass walk
                found.append(item)
    return found
