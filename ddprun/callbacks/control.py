"""Callbacks that steer the loop: `ControlFlowCallback` (run another callback only on some
stages, epochs or loaders) and `CheckRunCallback` (a few batches and epochs, to check a
pipeline). `PeriodicLoaderCallback` and `BatchOverfitCallback` are in ``loaders.py``.

Every decision here depends only on the stage, the epoch, the loader key and this rank's
batch counter, so under DDP every rank takes it at the same point: training loaders keep the
same number of batches on every rank (the engine shards them so), as gradient sync and the
runner's stop agreement need.
"""

from __future__ import annotations

import builtins
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ddprun.callbacks._portable import portable
from ddprun.core.callback import Callback, CallbackOrder, Event

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

FilterFn = Callable[[str, int, str], bool]


# ---------------------------------------------------------------- control flow
class ControlFlowCallback(Callback):
    """Run `base_callback` only on the epochs and loaders the filters allow.

    Args:
        base_callback: the callback to wrap (kept as ``.callback``); its `order` and `node`
            are this wrapper's.
        epochs: an int n: epochs n, 2n, 3n, ...; or a list of epoch numbers.
        ignore_epochs: the same, for the epochs to skip.
        loaders: a loader key or list of keys; or ``{loader_key: epoch or [epochs]}``: those
            loaders on those epochs only.
        ignore_loaders: the same, for the loaders (and epochs) to skip.
        filter_fn: ``fn(stage_key, epoch, loader_key) -> bool``, or its source text
            (``"lambda stage, epoch, loader: ..."``).
        use_global_epochs: count epochs over all stages instead of within the stage.

    Several filters must all pass (Catalyst 21.12 silently used only the first one given).
    The filters decide per loader: ``on_loader_start`` ... ``on_loader_end`` reach the wrapped
    callback only on loaders that pass, and ``on_epoch_start``/``on_epoch_end`` only in epochs
    where at least one of the epoch's loaders passes; stage, experiment and exception events
    always do, so the callback can set itself up. A wrapped metric callback registers its
    metric (``runner.track_metric``) on the same loaders on every rank: the filters are
    deterministic. Lambdas given as `filter_fn` travel to spawned DDP workers (Catalyst's
    issue #1317).
    """

    def __init__(
        self,
        base_callback: Callback,
        epochs: int | Sequence[int] | None = None,
        ignore_epochs: int | Sequence[int] | None = None,
        loaders: str | Sequence[str] | Mapping[str, int | Sequence[int]] | None = None,
        ignore_loaders: str | Sequence[str] | Mapping[str, int | Sequence[int]] | None = None,
        filter_fn: str | FilterFn | None = None,
        use_global_epochs: bool = False,
    ) -> None:
        if not isinstance(base_callback, Callback):
            raise TypeError(
                f"base_callback must be a ddprun Callback, got {type(base_callback).__name__}"
            )
        super().__init__(order=base_callback.order, node=base_callback.node)
        self.callback = base_callback
        self.use_global_epochs = bool(use_global_epochs)
        self.filters: list[Callable[[str, int, str], bool]] = []
        if epochs is not None:
            self.filters.append(_EpochFilter(epochs, "epochs", keep=True))
        if ignore_epochs is not None:
            self.filters.append(_EpochFilter(ignore_epochs, "ignore_epochs", keep=False))
        if loaders is not None:
            self.filters.append(_LoaderFilter(loaders, "loaders", keep=True))
        if ignore_loaders is not None:
            self.filters.append(_LoaderFilter(ignore_loaders, "ignore_loaders", keep=False))
        if filter_fn is not None:
            self.filters.append(_user_filter(filter_fn))
        if not self.filters:
            raise ValueError(
                "ControlFlowCallback needs one of epochs, ignore_epochs, loaders, "
                "ignore_loaders or filter_fn"
            )
        # which batch methods the wrapped callback has: the wrapper is called for every
        # event, so per batch it costs one attribute check
        self._has_batch_start = _overrides(base_callback, Event.BATCH_START)
        self._has_batch_end = _overrides(base_callback, Event.BATCH_END)
        self._epoch_on = self._loader_on = self._batch_start_on = self._batch_end_on = False

    def passes(self, stage: str, epoch: int, loader: str) -> bool:
        """Whether the wrapped callback runs on `loader` in `epoch` of `stage`."""
        return all(check(stage, epoch, loader) for check in self.filters)

    def _epoch(self, runner: IRunner) -> int:
        return runner.global_epoch_step if self.use_global_epochs else runner.stage_epoch_step

    # ------------------------------------------------------------- always
    def on_experiment_start(self, runner: IRunner) -> None:
        self.callback.on_experiment_start(runner)

    def on_stage_start(self, runner: IRunner) -> None:
        self.callback.on_stage_start(runner)

    def on_stage_end(self, runner: IRunner) -> None:
        self.callback.on_stage_end(runner)

    def on_experiment_end(self, runner: IRunner) -> None:
        self.callback.on_experiment_end(runner)

    def on_exception(self, runner: IRunner) -> None:
        self.callback.on_exception(runner)

    # ------------------------------------------------------------- filtered
    def on_epoch_start(self, runner: IRunner) -> None:
        stage, epoch = runner.stage_key, self._epoch(runner)
        self._epoch_on = any(self.passes(stage, epoch, key) for key in runner.loaders)
        if self._epoch_on:
            self.callback.on_epoch_start(runner)

    def on_loader_start(self, runner: IRunner) -> None:
        on = self.passes(runner.stage_key, self._epoch(runner), runner.loader_key)
        self._loader_on = on
        self._batch_start_on = on and self._has_batch_start
        self._batch_end_on = on and self._has_batch_end
        if on:
            self.callback.on_loader_start(runner)

    def on_batch_start(self, runner: IRunner) -> None:
        if self._batch_start_on:
            self.callback.on_batch_start(runner)

    def on_batch_end(self, runner: IRunner) -> None:
        if self._batch_end_on:
            self.callback.on_batch_end(runner)

    def on_loader_end(self, runner: IRunner) -> None:
        if self._loader_on:
            self.callback.on_loader_end(runner)
        self._loader_on = self._batch_start_on = self._batch_end_on = False

    def on_epoch_end(self, runner: IRunner) -> None:
        if self._epoch_on:
            self.callback.on_epoch_end(runner)


def unwrap_callback(callback: Callback) -> Callback:
    """The callback a `ControlFlowCallback` wraps (through nested ones), else `callback`: for
    "is there a callback of this kind?" checks, which in Catalyst see through wrappers."""
    while isinstance(callback, ControlFlowCallback):
        callback = callback.callback
    return callback


def _overrides(callback: Callback, event: Event) -> bool:
    method = getattr(type(callback), event.value, None)
    return method is not None and method is not getattr(Callback, event.value)


def whole_number(value: Any, what: str, minimum: int) -> int:
    """`value` as an int >= `minimum` (whole floats accepted), else a ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value != int(value) or int(value) < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


class _EpochFilter:
    """``epochs=n``: every n-th epoch; ``epochs=[...]``: those epochs (`keep` False: the rest)."""

    def __init__(self, epochs: Any, name: str, keep: bool) -> None:
        self.keep = keep
        if isinstance(epochs, (list, tuple, set, frozenset)):
            self.period, self.epochs = None, {whole_number(e, f"{name} entries", 1) for e in epochs}
        else:
            self.period, self.epochs = whole_number(epochs, name, 1), set()

    def __call__(self, stage: str, epoch: int, loader: str) -> bool:
        hit = epoch % self.period == 0 if self.period is not None else epoch in self.epochs
        return hit == self.keep


class _LoaderFilter:
    """Loader keys, or ``{loader_key: epochs}`` (`keep` False: everything else)."""

    def __init__(self, loaders: Any, name: str, keep: bool) -> None:
        self.keep = keep
        self.by_loader: dict[str, set[int]] | None = None
        if isinstance(loaders, str):
            loaders = [loaders]
        if isinstance(loaders, Mapping):
            self.by_loader = {}
            for key, epochs in loaders.items():
                listed = epochs if isinstance(epochs, (list, tuple, set, frozenset)) else [epochs]
                self.by_loader[key] = {whole_number(e, f"{name}[{key!r}]", 1) for e in listed}
            self.keys = set(self.by_loader)
        elif isinstance(loaders, (list, tuple, set, frozenset)) and all(
            isinstance(k, str) for k in loaders
        ):
            self.keys = set(loaders)
        else:
            raise ValueError(
                f"{name} must be a loader key, a list of keys or {{key: epochs}}, got {loaders!r}"
            )

    def __call__(self, stage: str, epoch: int, loader: str) -> bool:
        if self.by_loader is None:
            hit = loader in self.keys
        else:
            hit = epoch in self.by_loader.get(loader, ())
        return hit == self.keep


class _SourceFilter:
    """A filter given as source text; pickles as its text (compiled again where unpickled)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.fn = _checked_filter(_compile_filter(source), repr(source))

    def __call__(self, stage: str, epoch: int, loader: str) -> bool:
        return self.fn(stage, epoch, loader)

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"])


def _compile_filter(source: str) -> Any:
    try:
        return eval(source, {"__builtins__": builtins})  # the user's own code, as in Catalyst
    except SyntaxError as error:
        raise ValueError(
            f"filter_fn {source!r} is not valid Python; expected e.g. "
            "\"lambda stage, epoch, loader: loader != 'train' and epoch % 2 == 0\""
        ) from error


def _checked_filter(fn: Any, shown: str) -> Any:
    if not callable(fn):
        raise ValueError(f"filter_fn {shown} is not callable; expected fn(stage, epoch, loader)")
    try:
        inspect.signature(fn).bind("stage", 1, "loader")
    except TypeError as error:
        raise ValueError(
            f"filter_fn {shown} must take three arguments (stage, epoch, loader): {error}"
        ) from None
    except ValueError:  # builtins without a signature: checked when called
        pass
    return fn


def _user_filter(filter_fn: Any) -> Any:
    if isinstance(filter_fn, str):
        return _SourceFilter(filter_fn)
    return portable(_checked_filter(filter_fn, getattr(filter_fn, "__name__", repr(filter_fn))))


# ------------------------------------------------------------------ check run
class CheckRunCallback(Callback):
    """End every loader after `num_batch_steps` batches and the stage after `num_epoch_steps`
    epochs (``runner.need_early_stop``): a quick check that the whole pipeline runs.

    Batches are this rank's (``loader_batch_step``), so under DDP every rank runs
    `num_batch_steps` batches of each loader (Catalyst 21.12 counted batches of all ranks).
    """

    def __init__(self, num_batch_steps: int = 3, num_epoch_steps: int = 3) -> None:
        super().__init__(order=CallbackOrder.External)
        self.num_batch_steps = whole_number(num_batch_steps, "num_batch_steps", 1)
        self.num_epoch_steps = whole_number(num_epoch_steps, "num_epoch_steps", 1)

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.loader_batch_step >= self.num_batch_steps:
            runner.need_early_stop = True

    def on_epoch_end(self, runner: IRunner) -> None:
        if runner.stage_epoch_step >= self.num_epoch_steps:
            runner.need_early_stop = True
