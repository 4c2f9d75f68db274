"""Per-batch callbacks: `MetricAggregationCallback` (several metrics into one, e.g. two losses
into the ``loss`` the OptimizerCallback steps on) and `BatchTransformCallback` (a function
applied to ``runner.batch``)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ddprun.callbacks._access import BatchKeyError, batch_value
from ddprun.callbacks._portable import portable
from ddprun.core.callback import Callback, CallbackOrder
from ddprun.metrics import AdditiveMetric

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

_MODES = ("sum", "mean", "weighted_sum", "weighted_mean")


class MetricAggregationCallback(Callback):
    """Put an aggregate of several metrics into ``batch_metrics`` or ``loader_metrics``.

    Runs at ``CallbackOrder.MetricAggregation`` (40): after the metric and criterion callbacks
    (20), before the OptimizerCallback (60), so ``metric_key="loss"`` is what it steps on.

    Args:
        metric_key: where the aggregate goes.
        metrics: the inputs: a key, a list of keys, or for the weighted modes ``{key: weight}``;
            None takes every other value present (for ``sum`` and ``mean``).
        mode: ``"sum"``, ``"mean"``, ``"weighted_sum"`` (``sum(w * m)``), ``"weighted_mean"``
            (``sum(w * m) / sum(w)``; Catalyst 21.12 crashes on it), or a callable
            ``fn(metrics: dict, runner) -> value`` that gets the whole metrics dict of the scope.
        scope: ``"batch"``: every batch, from ``batch_metrics``; tensors stay tensors on the
            device (no host sync) and keep their graph, so the aggregate can be backpropagated.
            Its loader value is, like any batch metric's, the sample-weighted mean of the batch
            values (for the linear modes that equals the aggregate of the loaders' means).
            ``"loader"``: at loader end, from ``loader_metrics`` -- the exact values of metric
            callbacks that ran before (order < 40) -- or, for a named key no callback put
            there (a per-batch value such as a loss), that value's loader average, which this
            callback keeps itself, exact across ranks in the loader-end reduction.
        multiplier: the aggregate is multiplied by it.

    ``infer*`` loaders are skipped (criterion callbacks write nothing there). A named key that
    is missing raises a KeyError naming it and listing the keys present.
    """

    def __init__(
        self,
        metric_key: str,
        metrics: str | Sequence[str] | Mapping[str, float] | None = None,
        mode: str | Callable[[dict[str, Any], Any], Any] = "mean",
        scope: str = "batch",
        multiplier: float = 1.0,
    ) -> None:
        super().__init__(order=CallbackOrder.MetricAggregation)
        if not isinstance(metric_key, str) or not metric_key:
            raise TypeError(f"metric_key must be a non-empty string, got {metric_key!r}")
        if scope not in ("batch", "loader"):
            raise ValueError(f"scope must be 'batch' or 'loader', got {scope!r}")
        if not callable(mode) and mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)} or a callable, got {mode!r}")
        self.metric_key, self.scope, self.multiplier = metric_key, scope, float(multiplier)
        self.mode = portable(mode) if callable(mode) else mode
        self.keys, self.weights = _parse_metrics(metrics, mode)
        if self.keys is not None and mode == "mean":
            self.weights = None  # mean: sum, then one multiplication by multiplier / n
        self._averages: dict[str, AdditiveMetric] = {}

    # ------------------------------------------------------------------ events
    def on_loader_start(self, runner: IRunner) -> None:
        if self.scope != "loader" or runner.is_infer_loader or not self.keys:
            return
        # named keys: averaged here too, for those no metric callback computes per loader
        for key in self.keys:
            if key not in self._averages:
                self._averages[key] = AdditiveMetric(metric_key=key, with_std=False)
            average = self._averages[key].to(runner.device)
            average.reset()
            runner.track_metric(average)

    def on_batch_end(self, runner: IRunner) -> None:
        if runner.is_infer_loader:
            return
        metrics = runner.batch_metrics
        if self.scope == "batch":
            metrics[self.metric_key] = self._aggregate(metrics, runner, "batch_metrics")
            return
        for key, average in self._averages.items():
            value = metrics.get(key)
            if value is not None:
                average.update(value, runner.batch_size)

    def on_loader_end(self, runner: IRunner) -> None:
        if self.scope != "loader" or runner.is_infer_loader:
            return
        metrics = dict(runner.loader_metrics)
        for key, average in self._averages.items():
            average.fold_pending()  # its sample count is kept on the host between batches
            if key not in metrics and float(average.num_samples) > 0:
                metrics[key] = average.compute()[0]
        runner.loader_metrics[self.metric_key] = float(
            self._aggregate(metrics, runner, "loader_metrics")
        )

    # ------------------------------------------------------------- arithmetic
    def _aggregate(self, metrics: Mapping[str, Any], runner: IRunner, where: str) -> Any:
        if callable(self.mode):
            value = self.mode(metrics, runner)
            return value * self.multiplier if self.multiplier != 1.0 else value
        keys = self.keys
        if keys is None:
            keys = [k for k in metrics if k != self.metric_key]
            if not keys:
                raise BatchKeyError(
                    f"MetricAggregationCallback({self.metric_key!r}): nothing to aggregate, "
                    f"{where} of loader {runner.loader_key!r} is empty"
                )
        total: Any = None
        try:
            for index, key in enumerate(keys):
                value = metrics[key]
                if self.weights is not None:
                    value = value * self.weights[index]
                total = value if total is None else total + value
        except KeyError:
            missing = [k for k in keys if k not in metrics]
            raise BatchKeyError(
                f"MetricAggregationCallback({self.metric_key!r}): {where} of loader "
                f"{runner.loader_key!r} has no {missing} (keys present: {sorted(metrics)})"
            ) from None
        scale = self.multiplier / len(keys) if self.mode == "mean" else self.multiplier
        return total * scale if scale != 1.0 else total


def _parse_metrics(metrics: Any, mode: Any) -> tuple[list[str] | None, list[float] | None]:
    """(keys, per-key weights) for the linear modes; weights None means all 1."""
    weighted = mode in ("weighted_sum", "weighted_mean")
    if weighted and (not isinstance(metrics, Mapping) or not metrics):
        raise ValueError(
            f"mode={mode!r} needs metrics as a non-empty dict {{key: weight}}, got {metrics!r}"
        )
    if isinstance(metrics, Mapping):
        if not weighted and not callable(mode):
            raise ValueError(
                f"mode={mode!r} takes metrics as a key or a list of keys; for weights "
                f"{dict(metrics)!r} use mode='weighted_sum' or 'weighted_mean'"
            )
        keys = [_key(k) for k in metrics]
        weights = [_weight(k, w) for k, w in metrics.items()]
        if mode == "weighted_mean":
            norm = sum(weights)
            if norm == 0:
                raise ValueError(f"weighted_mean: the weights {dict(metrics)!r} sum to 0")
            weights = [w / norm for w in weights]
        return keys, weights
    if metrics is None:
        return None, None
    if isinstance(metrics, str):
        return [metrics], None
    if isinstance(metrics, Sequence) and metrics:
        return [_key(k) for k in metrics], None
    raise TypeError(f"metrics must be a key, a list of keys or a dict, got {metrics!r}")


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"metric keys must be strings, got {key!r}")
    return key


def _weight(key: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"the weight of {key!r} must be a number, got {weight!r}")
    return float(weight)


# ------------------------------------------------------------------ transforms
class BatchTransformCallback(Callback):
    """Apply `transform` to ``runner.batch`` before or after `handle_batch`.

    Args:
        transform: a callable; a list of them (applied in order, each to the previous output);
            or a name: ``"F.sigmoid"`` (``torch.nn.functional``), ``"torch.sigmoid"``, a bare
            name found in ``torch.nn.functional`` or ``torch``, or an import path
            ``"package.module.name"``. A class (given or named) is instantiated with
            `transform_kwargs`; a function gets them as keyword arguments on every call.
        scope: ``"on_batch_start"`` (preprocess the inputs, before `handle_batch`) or
            ``"on_batch_end"`` (post-process the outputs, before the metric callbacks: it runs
            at ``CallbackOrder.Internal``).
        input_key: a key or list of keys of ``runner.batch`` passed as positional arguments;
            None passes the whole batch and replaces it with the result.
        output_key: where the results go (default: `input_key`, in place). One key takes the
            result as is; several take the items of the returned sequence, which must have as
            many.
        transform_kwargs: keyword arguments for `transform`.
    """

    def __init__(
        self,
        transform: Callable[..., Any] | str | Sequence[Callable[..., Any] | str],
        scope: str,
        input_key: str | Sequence[str] | None = None,
        output_key: str | Sequence[str] | None = None,
        transform_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Internal)
        if scope not in ("on_batch_start", "on_batch_end"):
            raise ValueError(f"scope must be 'on_batch_start' or 'on_batch_end', got {scope!r}")
        self.scope = scope
        self.transform = _build_transform(transform, transform_kwargs)
        self.input_key = _keys(input_key, "input_key")
        self.output_key = _keys(output_key, "output_key") or self.input_key
        if output_key is not None and input_key is None:
            raise ValueError(
                f"output_key={output_key!r} needs an input_key: without one the transform "
                "takes and returns the whole batch"
            )

    def on_batch_start(self, runner: IRunner) -> None:
        if self.scope == "on_batch_start":
            self._apply(runner)

    def on_batch_end(self, runner: IRunner) -> None:
        if self.scope == "on_batch_end":
            self._apply(runner)

    def _apply(self, runner: IRunner) -> None:
        if self.input_key is None:
            runner.batch = self.transform(runner.batch)
            return
        args = [batch_value(runner, key, "BatchTransformCallback") for key in self.input_key]
        result = self.transform(*args)
        if len(self.output_key) == 1:
            runner.batch[self.output_key[0]] = result
            return
        if not isinstance(result, (list, tuple)) or len(result) != len(self.output_key):
            got = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
            raise ValueError(
                f"BatchTransformCallback: output_key={self.output_key} needs "
                f"{len(self.output_key)} results from the transform, got {got}"
            )
        for key, value in zip(self.output_key, result):
            runner.batch[key] = value


def _keys(keys: Any, name: str) -> list[str] | None:
    if keys is None:
        return None
    if isinstance(keys, str):
        return [keys]
    if isinstance(keys, (list, tuple)) and keys and all(isinstance(k, str) for k in keys):
        return list(keys)
    raise TypeError(f"{name} must be a key or a non-empty list of keys, got {keys!r}")


def _build_transform(transform: Any, kwargs: Mapping[str, Any] | None) -> Callable[..., Any]:
    if isinstance(transform, (list, tuple)):
        if kwargs:
            raise ValueError("transform_kwargs needs a single transform, not a list of them")
        if not transform:
            raise ValueError("transform is an empty list; give at least one callable")
        return _Chain([_build_transform(t, None) for t in transform])
    if isinstance(transform, str):
        transform = resolve_callable(transform)
    if inspect.isclass(transform):
        return transform(**dict(kwargs or {}))
    if not callable(transform):
        raise TypeError(
            f"transform must be a callable, a name or a list of them, got {transform!r}"
        )
    transform = portable(transform)
    return functools.partial(transform, **kwargs) if kwargs else transform


class _Chain:
    """Transforms applied in order (a plain class: it pickles for spawned workers)."""

    def __init__(self, transforms: list[Callable[..., Any]]) -> None:
        self.transforms = transforms

    def __call__(self, value: Any) -> Any:
        for transform in self.transforms:
            value = transform(value)
        return value


def resolve_callable(name: str) -> Any:
    """The object a transform name stands for: ``"F.x"`` in ``torch.nn.functional``,
    ``"torch.x.y"`` under torch, an import path ``"a.b.c"``, or a bare name looked up in
    ``torch.nn.functional`` then ``torch``. Raises ValueError naming the forms it tried."""
    candidates: list[tuple[Any, str]] = []
    if name.startswith("F."):
        candidates.append((torch.nn.functional, name[2:]))
    elif name.startswith("torch."):
        candidates.append((torch, name[len("torch.") :]))
    elif "." not in name:
        candidates += [(torch.nn.functional, name), (torch, name)]
    for module, path in candidates:
        found = _getattr_path(module, path)
        if found is not None:
            return found
    if "." in name and not name.startswith("F."):
        module_name, _, attribute = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            found = _getattr_path(_import_head(name), name.partition(".")[2])
            if found is not None:
                return found
    raise ValueError(
        f"transform {name!r} not found; use a callable, 'F.<name>' (torch.nn.functional), "
        "'torch.<name>', a bare torch function name, or an import path 'package.module.name'"
    )


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if callable(obj) else None


def _import_head(name: str) -> Any:
    try:
        return importlib.import_module(name.partition(".")[0])
    except ImportError:
        return None
