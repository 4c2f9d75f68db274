"""`BatchMetrics`: the dict behind ``runner.batch_metrics``, whose deferred values are computed
when first read.

A metric callback's per-batch value (the batch accuracy) is one more small tensor op per batch,
wasted when nothing reads it: the loader value comes from the metric's exact states, and on a
0.3 ms step every op shows. `defer(keys, compute)` puts placeholders under `keys`, so ``in``,
``len``, the key order and iteration over the keys are as if the values were there, and
``compute(*args)`` runs at the first read of a value: ``bm[key]``, `get`, `values`, `items`, `copy`,
``dict(bm)``, ``{**bm}``, ``f(**bm)``, ``==``, `repr`, `pop`, pickling. Writing a key replaces
its placeholder as it would replace a value; a later `defer` of a key replaces what was there.
A view from `values()` / `items()` taken before a later `defer` in the same batch may show its
placeholder: take views after the metric callbacks (``on_batch_end`` with a later order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["BatchMetrics", "Deferred"]

_ABSENT = object()


class Deferred(tuple):
    """Values of some keys not computed yet: ``(keys, compute, args)``; one ``compute(*args)``
    gives them all, in key order (a tuple: made per batch without a Python call).

    What a `BatchMetrics` stores under a deferred key; code that reads the stored values
    without computing them (``dict.items(bm)``: the runner's per-key averages, which skip the
    keys metrics compute exactly) reads a key holding one through ``bm[key]``.
    """

    __slots__ = ()

    def resolve(self, metrics: dict) -> None:
        """Compute the values; keys still holding this placeholder take them."""
        keys, compute, args = self
        for key, value in zip(keys, compute(*args), strict=True):
            if dict.get(metrics, key) is self:
                dict.__setitem__(metrics, key, value)


class BatchMetrics(dict):
    """A plain dict of one batch's metrics, plus `defer` (values computed when first read)."""

    __slots__ = ()

    def defer(self, keys: Sequence[str], compute: Callable[..., Sequence[Any]], *args: Any) -> None:
        """Put the values ``compute(*args)`` returns (one per key, in order) under `keys`,
        computed at the first read of any of them, or never when nothing reads them. `args`
        are kept as they are: pass tensors this batch made, not states that change later."""
        pending = Deferred((keys, compute, args))
        for key in keys:
            dict.__setitem__(self, key, pending)

    def resolve(self) -> None:
        """Compute every deferred value now."""
        for key in list(dict.keys(self)):
            value = dict.get(self, key)  # resolving one key resolves its siblings too
            if type(value) is Deferred:
                value.resolve(self)

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if type(value) is Deferred:
            value.resolve(self)
            value = dict.__getitem__(self, key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        # defined so that dict(bm), {**bm} and f(**bm) read values through __getitem__
        # (CPython copies a dict subclass's storage directly only when it keeps dict's __iter__)
        return dict.__iter__(self)

    def values(self) -> Any:  # noqa: D102 - dict's
        self.resolve()
        return dict.values(self)

    def items(self) -> Any:  # noqa: D102 - dict's
        self.resolve()
        return dict.items(self)

    def copy(self) -> dict[str, Any]:  # noqa: D102 - dict's (a plain dict, as dict.copy gives)
        self.resolve()
        return dict(dict.items(self))

    def pop(self, key: str, *default: Any) -> Any:  # noqa: D102 - dict's
        if key in self:
            self[key]  # noqa: B018 - resolves a placeholder under `key`
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[str, Any]:  # noqa: D102 - dict's
        self.resolve()
        return dict.popitem(self)

    def setdefault(self, key: str, default: Any = None) -> Any:  # noqa: D102 - dict's
        if key in self:
            return self[key]
        dict.__setitem__(self, key, default)
        return default

    def __eq__(self, other: object) -> bool:
        self.resolve()
        if isinstance(other, BatchMetrics):
            other.resolve()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> Any:
        self.resolve()
        return dict.__or__(self, other)

    def __repr__(self) -> str:
        self.resolve()
        return dict.__repr__(self)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return dict, (self.copy(),)  # pickles and copies as a plain dict of computed values
