"""User functions that survive the trip to spawned DDP workers.

Spawn mode pickles the runner with its callbacks (see ``DistributedDataParallelEngine.spawn``),
and plain pickle stores a function by its importable name, so a lambda or a nested function
given to a callback (``ControlFlowCallback(filter_fn=lambda s, e, l: ...)``, a
``BatchTransformCallback`` transform, a ``MetricAggregationCallback`` mode) cannot be sent:
Catalyst 21.12 fails there (its issue #1317). `Portable` holds such a function and, when it has
no importable name, pickles its code object (``marshal``: the workers run the same interpreter)
with its module's name, defaults and closure values; the worker rebuilds it against that
module's globals (``__main__`` is the user's script there too). Under a launcher nothing is
pickled and this costs nothing.
"""

from __future__ import annotations

import marshal
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any


class Portable:
    """A callable wrapper that pickles lambdas and nested functions by their code.

    Args:
        fn: the function; anything picklable by name is pickled as usual.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        fn = self.fn
        if not isinstance(fn, types.FunctionType) or _pickles_by_name(fn):
            return (Portable, (fn,))
        cells = tuple(cell.cell_contents for cell in fn.__closure__ or ())
        state = (fn.__defaults__, fn.__kwdefaults__, cells)
        return (_rebuild, (marshal.dumps(fn.__code__), fn.__module__, fn.__name__, state))


def portable(fn: Any) -> Any:
    """`fn` wrapped in `Portable` when it is a plain Python function, else `fn` itself."""
    return Portable(fn) if isinstance(fn, types.FunctionType) else fn


def _pickles_by_name(fn: types.FunctionType) -> bool:
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def _rebuild(code: bytes, module: str, name: str, state: tuple[Any, ...]) -> Portable:
    defaults, kwdefaults, cells = state
    namespace = getattr(sys.modules.get(module), "__dict__", None)
    if namespace is None:  # e.g. defined in a module the worker has not imported
        namespace = vars(__import__(module, fromlist=["_"]))
    closure = tuple(types.CellType(value) for value in cells) or None
    fn = types.FunctionType(marshal.loads(code), namespace, name, defaults, closure)
    fn.__kwdefaults__ = kwdefaults
    return Portable(fn)
