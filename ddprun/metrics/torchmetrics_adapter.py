"""`TorchMetric`: a ``torchmetrics.Metric`` synced by ddprun, in the runner's one loader-end sync.

torchmetrics syncs each metric itself (an all-gather per state, per metric, at every `compute`).
The adapter switches that off (``sync_on_compute=False``, ``dist_sync_on_step=False``) and shows
the metric's states to `ddprun.metrics.sync.synchronized`, packed by their ``dist_reduce_fx``:

- "sum", "max", "min" tensors as they are (into the shared all-reduces);
- "mean" tensors as "sum", divided by the number of ranks (a hidden "sum" counter) afterwards;
- "cat" tensors and list states (reduced by "cat" or None) flattened to 1-D "cat" states (the
  shared all-gather), with a small "sum" layout state carrying their row shape and dtype (so a
  rank that saw no batch still rebuilds the gathered tensors) and, for lists, each element's
  row count; after the sync a "cat" list is one tensor and a None list every rank's elements,
  as torchmetrics' own sync leaves them (but ranks may hold lists of different lengths);
- tensors with a custom callable or None as a one-row "cat" state: the gathered rows are
  stacked and handed to the callable (None: kept stacked), as torchmetrics does.

So a tracked `TorchMetric` adds no collective of its own: the loader end still issues one sum
all-reduce (plus the max all-reduce and the all-gather only when some metric needs them).
torchmetrics is optional (``pip install ddprun[torchmetrics]``); this module imports it only
when an adapter is built. Reading the synced value: call `compute()` (or the wrapped metric's
own ``compute()``) inside the sync, e.g. in ``on_loader_end``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from ddprun.metrics._support import affix
from ddprun.metrics.metric import Metric

__all__ = ["TorchMetric", "adapt_torchmetric", "import_torchmetrics"]

_RANKS = "@ranks"  # hidden "sum" state: how many ranks were combined (1 when local)
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_MAX_ROW_DIMS = 6


def import_torchmetrics() -> Any:
    """The torchmetrics module, or an ImportError saying how to install it."""
    try:
        import torchmetrics
    except ImportError as error:
        raise ImportError(
            "ddprun's TorchMetric / TorchMetricsCallback need torchmetrics, which is not "
            "installed: pip install 'ddprun[torchmetrics]' (or pip install torchmetrics)"
        ) from error
    return torchmetrics


def _never_distributed() -> bool:
    """torchmetrics' distributed check for adapted metrics: ddprun does their syncing."""
    return False


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class TorchMetric(Metric):
    """Wraps a ``torchmetrics.Metric`` so that ddprun syncs it (see the module docstring).

    Track it like any ddprun metric: ``runner.track_metric(TorchMetric(m))`` in a callback's
    ``on_loader_start``, or hold it as a runner attribute, or use `TorchMetricsCallback`.
    `update`/`reset`/`to` forward to the wrapped metric; `compute_key_value` names a scalar
    result `key`, a (C,) result ``key/class_00`` ..., a dict result by its own keys (each with
    prefix and suffix); results of higher rank (e.g. a confusion matrix) are left to `compute()`.

    Per-batch host syncs are the wrapped metric's: many torchmetrics classes check their inputs
    on the host unless built with ``validate_args=False``.

    Args:
        metric: the torchmetrics metric (not a MetricCollection: wrap each metric).
        key: the result's key (default: the class name in snake case, e.g.
            ``multiclass_accuracy``).
        compute_on_call: whether calling the adapter returns `compute()`.
        prefix, suffix: put around the keys.

    Raises:
        ImportError: torchmetrics is not installed.
        TypeError: `metric` is not a ``torchmetrics.Metric``, or a state is a list whose
            reduction is not "cat".
    """

    def __init__(
        self,
        metric: Any,
        key: str | None = None,
        compute_on_call: bool = True,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        tm = import_torchmetrics()
        if isinstance(metric, tm.MetricCollection):
            raise TypeError("TorchMetric wraps one torchmetrics.Metric; wrap each metric")
        if not isinstance(metric, tm.Metric):
            raise TypeError(f"TorchMetric needs a torchmetrics.Metric, got {type(metric)!r}")
        self.metric = metric
        self.key = key or _snake(type(metric).__name__)
        self.prefix, self.suffix = prefix, suffix
        # ddprun syncs the states; torchmetrics must never sync them again
        metric.sync_on_compute = False
        metric.dist_sync_on_step = False
        metric._to_sync = False
        metric.distributed_available_fn = _never_distributed
        self._kinds = {name: self._kind(name, fx) for name, fx in metric._reductions.items()}
        self._device = metric.device
        self._local_updates: int | None = None

    def _kind(self, name: str, fx: Any) -> str:
        """How a state travels: "sum", "max", "min", "mean", "stack", "cat" (a tensor) or
        "list" (a list reduced by "cat" or None)."""
        from torchmetrics.utilities import data as tm_data

        by_fn = {
            tm_data.dim_zero_sum: "sum",
            tm_data.dim_zero_max: "max",
            tm_data.dim_zero_min: "min",
            tm_data.dim_zero_mean: "mean",
            tm_data.dim_zero_cat: "cat",
        }
        kind = by_fn.get(fx, "stack")
        if isinstance(self.metric._defaults[name], list):
            if fx is not None and kind != "cat":
                raise TypeError(
                    f"TorchMetric: state {name!r} of {type(self.metric).__name__} is a list "
                    f"reduced by {fx!r}; ddprun syncs list states reduced by 'cat' or None"
                )
            return "list"
        return kind

    # ------------------------------------------------------------ sync layer
    @property
    @override
    def reductions(self) -> Mapping[str, str]:
        """The exposed states and how the sync layer combines each (see the module docstring)."""
        result = {}
        for name, kind in self._kinds.items():
            if kind in ("cat", "list"):
                result[name], result[f"{name}@layout"] = "cat", "sum"
                if kind == "list":
                    result[f"{name}@lengths"] = "cat"
            else:
                result[name] = {"mean": "sum", "stack": "cat"}.get(kind, kind)
        result[_RANKS] = "sum"
        return result

    @override
    def get_states(self) -> dict[str, Tensor]:
        """The wrapped states as the sync layer packs them (see the module docstring)."""
        states: dict[str, Tensor] = {}
        for name, kind in self._kinds.items():
            value = getattr(self.metric, name)
            if kind == "list" and isinstance(value, Tensor):
                value = [value]  # after a torchmetrics-style sync a list state is one tensor
            if kind in ("cat", "list"):
                parts = value if kind == "list" else ([value] if value.numel() else [])
                flat, layout, lengths = _pack_rows(parts, self.device)
                states[name], states[f"{name}@layout"] = flat, layout
                if kind == "list":
                    states[f"{name}@lengths"] = lengths
            elif kind == "stack":
                states[name] = value.unsqueeze(0)
            else:
                states[name] = value
        states[_RANKS] = torch.ones((), dtype=torch.int64, device=self.device)
        return states

    @override
    def replace_states(self, states: Mapping[str, Tensor]) -> None:
        """Sets the wrapped states from exposed ones: synced ones as torchmetrics' own sync
        leaves them, local ones (``@ranks`` == 1: restored after a sync, or loaded) as they were."""
        synced = int(states[_RANKS]) > 1 if _RANKS in states else False
        for name, kind in self._kinds.items():
            if name not in states:
                continue
            value = states[name]
            fx = self.metric._reductions[name]
            if kind in ("cat", "list"):
                lengths = states.get(f"{name}@lengths")
                parts = _unpack_rows(value, states[f"{name}@layout"], lengths)
                if kind == "list" and not (synced and fx is not None):
                    value = parts  # None: every rank's elements, in rank order
                elif parts:
                    value = torch.cat([p.reshape(1) if p.dim() == 0 else p for p in parts])
                else:
                    value = [] if kind == "list" else self.metric._defaults[name].clone()
            elif kind == "stack":
                value = (fx(value) if fx is not None else value) if synced else value[0]
            elif kind == "mean" and synced:
                value = value / int(states[_RANKS])
            setattr(self.metric, name, value)
        self.metric._computed = None
        # torchmetrics warns when computing with no update of its own; synced states (e.g. on a
        # rank that saw no batch) hold other ranks' updates, so count one while they are in
        if synced and self._local_updates is None:
            self._local_updates = self.metric._update_count
            self.metric._update_count = max(self._local_updates, 1)
        elif not synced and self._local_updates is not None:
            self.metric._update_count, self._local_updates = self._local_updates, None

    # ------------------------------------------------------------- forwarding
    @property
    @override
    def device(self) -> torch.device:
        """The wrapped metric's device."""
        return self.metric.device

    @override
    def to(self, device: torch.device | str) -> TorchMetric:
        """Moves the wrapped metric to `device`."""
        self.metric.to(device)
        self._device = self.metric.device
        return self

    @override
    def reset(self) -> None:
        """Resets the wrapped metric."""
        self.metric.reset()
        self._local_updates = None

    @override
    def update(self, *args: Any, **kwargs: Any) -> None:
        """The wrapped metric's ``update`` (no sync)."""
        self.metric.update(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped metric's ``forward``: updates and returns this batch's value (no sync)."""
        return self.metric(*args, **kwargs)

    @override
    def compute(self) -> Any:
        """The wrapped metric's ``compute()`` on the current (inside the sync: global) states."""
        self.metric._computed = None
        return self.metric.compute()

    @override
    def compute_key_value(self) -> dict[str, float]:
        """Scalar values by key (see the class docstring)."""
        output: dict[str, float] = {}
        _flatten_result(self.compute(), self.key, output)
        return {affix(k, self.prefix, self.suffix): v for k, v in output.items()}


def _flatten_result(value: Any, key: str, output: dict[str, float]) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            _flatten_result(item, str(name), output)
    elif isinstance(value, Tensor) and value.dim() == 0:
        output[key] = float(value)
    elif isinstance(value, Tensor) and value.dim() == 1:
        for index, item in enumerate(value.tolist()):
            output[f"{key}/class_{index:02d}"] = float(item)
    elif isinstance(value, (int, float)):
        output[key] = float(value)


def adapt_torchmetric(value: Any) -> TorchMetric | None:
    """The `TorchMetric` for `value` when it is a ``torchmetrics.Metric`` (the same adapter on
    every call), else None; never imports torchmetrics (no instance can exist without it).

    For code that finds metrics a user holds (e.g. on a runner) and tracks them.
    """
    tm = sys.modules.get("torchmetrics")
    if tm is None or not isinstance(value, tm.Metric) or isinstance(value, tm.MetricCollection):
        return None
    adapter = value.__dict__.get("_ddprun_adapter")
    if adapter is None or adapter.metric is not value:  # none yet, or copied with a copy
        adapter = TorchMetric(value)
        value.__dict__["_ddprun_adapter"] = adapter
    return adapter


def _pack_rows(parts: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Tensors sharing a row shape as (1-D values, layout, rows per tensor).

    layout = has_parts x [1, dtype code, 0-dim flag, row dims + 1 ...]: summed over ranks and
    divided by its first entry it gives the row shape and dtype that every rank with parts
    shares, so a rank without any still rebuilds the gathered tensors.
    """
    layout = torch.zeros(3 + _MAX_ROW_DIMS, dtype=torch.int64)
    lengths = torch.tensor([1 if p.dim() == 0 else p.shape[0] for p in parts], dtype=torch.int64)
    if not parts:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return empty, layout.to(device), lengths.to(device)
    first = parts[0]
    row = tuple(first.shape[1:])
    for part in parts:
        if part.dim() != first.dim() or tuple(part.shape[1:]) != row or part.dtype != first.dtype:
            raise TypeError(
                f"TorchMetric: a list state mixes {tuple(first.shape)} {first.dtype} and "
                f"{tuple(part.shape)} {part.dtype} tensors; ddprun syncs lists of one row shape"
            )
    if len(row) > _MAX_ROW_DIMS or first.dtype not in _DTYPES:
        raise TypeError(f"TorchMetric cannot sync a {first.dtype} state of shape {first.shape}")
    layout[:3] = torch.tensor([1, _DTYPES.index(first.dtype), int(first.dim() == 0)])
    layout[3 : 3 + len(row)] = torch.tensor(row, dtype=torch.int64) + 1  # 0 ends the shape
    flat = torch.cat([p.reshape(-1) for p in parts])
    return flat, layout.to(device), lengths.to(device)


def _unpack_rows(flat: Tensor, layout: Tensor, lengths: Tensor | None) -> list[Tensor]:
    """The tensors `_pack_rows` packed (of every rank, after a sync), split by `lengths` (one
    tensor when None)."""
    ranks_with_parts = int(layout[0])
    if ranks_with_parts == 0:
        return []
    code = (layout // ranks_with_parts).tolist()
    dtype, scalar = _DTYPES[code[1]], bool(code[2])
    row = [d - 1 for d in code[3:] if d > 0]
    rows = flat.to(dtype).view(-1, *row)
    if lengths is None:
        return [rows]
    parts = list(rows.split(lengths.tolist()))
    return [p.reshape(()) for p in parts] if scalar else parts
