"""Shared pieces of the Catalyst-style metrics: key affixes, default top-k, growing "cat" states.

Metrics that keep whole-loader tensors (AUC scores, CMC embeddings) store them as 1-D "cat" states.
A rank that saw no batch still has an empty state of the same (1-D) layout as every other rank, so
the sync layer's one all-gather lines up without knowing the column count in advance; the metric
recovers the columns from a "sum" row count at compute time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddprun.metrics.metric import Metric

__all__ = ["GrowingMetric", "affix", "default_topk_args"]


def affix(key: str, prefix: str | None, suffix: str | None) -> str:
    """`key` with `prefix` before it and `suffix` before its first "/" (Catalyst's key layout).

    ``affix("auc/_micro", "valid_", "_x") == "valid_auc_x/_micro"``;
    ``affix("accuracy01", None, "/k") == "accuracy01/k"``.
    """
    head, sep, tail = key.partition("/")
    return f"{prefix or ''}{head}{suffix or ''}{sep}{tail}"


def default_topk_args(num_classes: int | None) -> tuple[int, ...]:
    """Catalyst 21.12's default k values: (1,), plus 3 above 3 classes, plus 5 above 5 classes."""
    ks = [1]
    if num_classes is not None and num_classes > 3:
        ks.append(3)
    if num_classes is not None and num_classes > 5:
        ks.append(5)
    return tuple(ks)


def check_topk(topk: Sequence[int]) -> tuple[int, ...]:
    """`topk` as a tuple of ints >= 1, or a ValueError naming what was given."""
    ks = tuple(int(k) for k in topk)
    if not ks or min(ks) < 1:
        raise ValueError(f"topk_args must be a non-empty sequence of k >= 1, got {tuple(topk)}")
    return ks


class GrowingMetric(Metric):
    """A `Metric` with `append(name, values)`: amortised O(1) appends to a 1-D "cat" state.

    Each appended state lives in a buffer that doubles when full; the state itself is a view of
    the filled part, so an append is one copy kernel and no host sync (only shapes are read).
    A state that was replaced from outside (sync, checkpoint load, `to`) is copied into a new
    buffer at the next append, so appends always continue from the current state.
    """

    def __init__(self, compute_on_call: bool = True) -> None:
        super().__init__(compute_on_call=compute_on_call)
        self._buffers: dict[str, Tensor] = {}

    def append(self, name: str, values: Tensor) -> None:
        """Appends `values` (flattened, cast to the state's dtype) to the 1-D state `name`."""
        current = getattr(self, name)
        values = values.reshape(-1)
        filled, added = current.numel(), values.numel()
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or filled + added > buffer.numel()
            or (filled and current.data_ptr() != buffer.data_ptr())
            or buffer.device != current.device
        ):
            capacity = max(2 * (filled + added), 256)
            grown = torch.empty(capacity, dtype=current.dtype, device=current.device)
            grown[:filled] = current
            buffer = self._buffers[name] = grown
        buffer[filled : filled + added] = values
        setattr(self, name, buffer[: filled + added])

    def reset(self) -> None:
        """Returns every state to its default and drops the append buffers."""
        self._buffers.clear()
        super().reset()

    def to(self, device: torch.device | str) -> GrowingMetric:
        """Moves every state to `device` (the append buffers start again there)."""
        self._buffers.clear()
        super().to(device)
        return self
