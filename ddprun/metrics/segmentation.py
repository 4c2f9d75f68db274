"""Region-based segmentation metrics (IoU, Dice, Tversky) from per-class tp/fp/fn sums.

The per-class sums are float64 states: with `class_names` or `weights` the class count is known
up front and they are "sum" states (in the one loader-end all-reduce); otherwise the count comes
from the first batch, and each rank's sums travel as one 1-D "cat" row (in the loader end's one
all-gather) with a "sum" count of ranks that saw data, so a rank without batches needs no class
count. Either way the loader values equal one process's to float64 rounding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from functools import partialmethod
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor
from typing_extensions import override

from ddprun.metrics._support import affix
from ddprun.metrics.metric import Metric

__all__ = [
    "DiceMetric",
    "IOUMetric",
    "RegionBasedMetric",
    "SegmentationResult",
    "TrevskyMetric",
    "segmentation_statistics",
]


_Init = TypeVar("_Init", bound=Callable[..., None])


def forwarding_signature(target: Callable[..., None], skip: int) -> Callable[[_Init], _Init]:
    """Decorates an ``__init__(self, <own parameters>, *args, **kwargs)`` that passes ``*args,
    **kwargs`` on to `target`: its ``__signature__`` becomes its own parameters followed by
    `target`'s after the first `skip` (``self`` and what it fills in itself).

    The shared parameters are written once, in `target`; `inspect.signature`, ``help()`` and
    the config registry's argument check still see the full list, in order.
    """

    def decorate(init: _Init) -> _Init:
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        own = inspect.signature(init)
        head = [p for p in own.parameters.values() if p.kind not in variadic]
        tail = list(inspect.signature(target).parameters.values())[skip:]
        init.__signature__ = own.replace(parameters=head + tail)  # type: ignore[attr-defined]
        return init

    return decorate


def segmentation_statistics(
    outputs: Tensor, targets: Tensor, class_dim: int = 1, threshold: float | None = None
) -> Tensor:
    """Per-class (tp, fp, fn) sums, a (3, K) float64 tensor, from same-shaped (N, K, ...) tensors.

    With a `threshold` the outputs become 0/1 (``output > threshold``); without one they are
    used as they are (soft counts from probabilities).

    Raises:
        ValueError: if the shapes differ or `class_dim` is out of range.
    """
    if outputs.shape != targets.shape:
        raise ValueError(
            f"segmentation outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
            "must have the same shape (N, K, ...)"
        )
    if not -outputs.dim() <= class_dim < outputs.dim():
        raise ValueError(f"class_dim={class_dim} is out of range for {outputs.dim()}-d outputs")
    if threshold is not None:
        outputs = outputs > threshold
    outputs = outputs.to(torch.float64 if outputs.dtype == torch.float64 else torch.float32)
    targets = targets.to(outputs.dtype)
    dims = [d for d in range(outputs.dim()) if d != class_dim % outputs.dim()]
    tp = (outputs * targets).sum(dim=dims, dtype=torch.float64)
    fp = outputs.sum(dim=dims, dtype=torch.float64) - tp
    fn = targets.sum(dim=dims, dtype=torch.float64) - tp
    return torch.stack([tp, fp, fn])


class SegmentationResult(NamedTuple):
    """What `RegionBasedMetric.compute()` returns: per-class (K,) values and the aggregates
    (`weighted` is None without class weights)."""

    per_class: Tensor
    micro: float
    macro: float
    weighted: float | None


class RegionBasedMetric(Metric):
    """Shared logic of `IOUMetric`, `DiceMetric` and `TrevskyMetric` (Catalyst 21.12's layout).

    A score from (tp, fp, fn) is ``(a + eps * [tp + fp + fn == 0]) / (b + eps)`` with a/b the
    metric's ratio, so a class absent from both outputs and targets scores 1. Loader keys:
    ``{name}/_micro`` (score of the summed counts), ``{name}`` and ``{name}/_macro`` (mean over
    classes), ``{name}/_weighted`` (sum of weight x score, with `weights`), and per class
    ``{name}/{class_name}`` with `compute_per_class_metrics`. Batch values (`update_key_value`):
    ``{name}`` and ``{name}/_weighted`` of the batch alone.

    Args:
        name: the key stem ("iou", "dice", "trevsky").
        class_dim: the class axis K of (N, K, ...) outputs and targets.
        weights: per-class weights for ``_weighted``.
        class_names: per-class key names (default ``class_00`` ...).
        threshold: binarise outputs with ``> threshold``; None keeps them soft.
        eps: the smoothing term above.
        compute_on_call, compute_per_class_metrics, prefix, suffix: as in Catalyst.
    """

    def __init__(
        self,
        name: str,
        class_dim: int = 1,
        weights: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        threshold: float | None = None,
        eps: float = 1e-7,
        compute_on_call: bool = True,
        compute_per_class_metrics: bool = False,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        if weights is not None and class_names is not None and len(weights) != len(class_names):
            raise ValueError(
                f"{len(weights)} weights but {len(class_names)} class_names: give one per class"
            )
        super().__init__(compute_on_call=compute_on_call)
        self.class_dim, self.threshold, self.eps = class_dim, threshold, float(eps)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.class_names = None if class_names is None else list(class_names)
        self.compute_per_class_metrics = compute_per_class_metrics
        self.name = affix(name, prefix, suffix)
        known = self.weights or self.class_names
        self._known_classes = None if known is None else len(known)
        if self._known_classes is None:
            self.add_state("stats", torch.zeros(0, dtype=torch.float64), "cat")
        else:
            self.add_state(
                "stats", torch.zeros(3 * self._known_classes, dtype=torch.float64), "sum"
            )
        self.add_state("ranks_with_data", torch.zeros((), dtype=torch.int64), "sum")
        self._device_weights: Tensor | None = None

    def _ratio(self, tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
        """The unsmoothed (numerator, denominator) of the metric for counts (per subclass)."""
        raise NotImplementedError

    def score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        """The metric's value for counts (any shape, float64): `_ratio`, smoothed as above."""
        numerator, denominator = self._ratio(tp, fp, fn)
        empty = (tp + fp + fn) == 0
        return (numerator + self.eps * empty) / (denominator + self.eps)

    @property
    def batch_keys(self) -> list[str]:
        """The keys `update_key_value` returns."""
        keys = [self.name]
        return keys + [f"{self.name}/_weighted"] if self.weights is not None else keys

    @override
    def update(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Adds one batch's per-class counts, without a host sync.

        Returns:
            The batch's per-class scores, a (K,) float64 tensor on the outputs' device.

        Raises:
            ValueError: for mismatched shapes, or a class count that differs from earlier
                batches, `weights` or `class_names`.
        """
        stats = segmentation_statistics(
            outputs.detach(), targets.detach(), self.class_dim, self.threshold
        )
        classes = stats.shape[1]
        expected = self._known_classes or (self.stats.numel() // 3 or classes)
        if classes != expected:
            raise ValueError(
                f"{type(self).__name__}: outputs have {classes} classes along class_dim="
                f"{self.class_dim}, expected {expected} (from weights / class_names or earlier "
                "batches)"
            )
        if self.stats.numel() == 0:
            self.stats = torch.zeros(3 * classes, dtype=torch.float64, device=stats.device)
        self.stats.view(3, classes).add_(stats)
        self.ranks_with_data.fill_(1)
        return self.score(*stats)

    def update_key_value(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """`update`, as the batch's ``{name}`` (class mean) and ``{name}/_weighted`` tensors."""
        per_class = self.update(outputs, targets)
        values = {self.name: per_class.mean()}
        if self.weights is not None:
            weights = self._device_weights
            if weights is None or weights.device != per_class.device:
                # made once per device: a host-to-device copy per batch would wait for it
                weights = torch.tensor(self.weights, dtype=torch.float64, device=per_class.device)
                self._device_weights = weights
            values[f"{self.name}/_weighted"] = (per_class * weights).sum()
        return values

    def _totals(self) -> Tensor | None:
        """The (3, K) counts over every rank, or None when nobody saw a batch."""
        ranks = int(self.ranks_with_data)
        if ranks == 0:
            return None
        classes = self._known_classes or self.stats.numel() // (3 * ranks)
        return self.stats.view(-1, 3, classes).sum(dim=0).cpu()

    @override
    def compute(self) -> SegmentationResult:
        """Per-class, micro, macro and (with weights) weighted scores (NaN before any batch)."""
        totals = self._totals()
        if totals is None:
            empty = torch.zeros(0, dtype=torch.float64)
            return SegmentationResult(empty, math.nan, math.nan, None)
        per_class = self.score(*totals)
        micro = float(self.score(*totals.sum(dim=1)))
        weighted = None
        if self.weights is not None:
            weighted = float((per_class * torch.tensor(self.weights, dtype=torch.float64)).sum())
        return SegmentationResult(per_class, micro, float(per_class.mean()), weighted)

    @override
    def compute_key_value(self) -> dict[str, float]:
        """Per-class keys (when asked for), ``_micro``, the macro key, ``_macro``, ``_weighted``."""
        result = self.compute()
        output = {}
        if self.compute_per_class_metrics:
            names = self.class_names or [f"class_{i:02d}" for i in range(len(result.per_class))]
            output.update({f"{self.name}/{n}": v for n, v in zip(names, result.per_class.tolist())})
        output[f"{self.name}/_micro"] = result.micro
        output[self.name] = result.macro
        output[f"{self.name}/_macro"] = result.macro
        if result.weighted is not None:
            output[f"{self.name}/_weighted"] = result.weighted
        return output


class IOUMetric(RegionBasedMetric):
    """IoU (Jaccard): tp / (tp + fp + fn); keys ``iou``, ``iou/_micro`` ... (see the base)."""

    __init__ = partialmethod(RegionBasedMetric.__init__, "iou")

    @override
    def _ratio(self, tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
        return tp, tp + fp + fn


class DiceMetric(RegionBasedMetric):
    """Dice (F1): 2 tp / (2 tp + fp + fn); keys ``dice``, ``dice/_micro`` ... (see the base)."""

    __init__ = partialmethod(RegionBasedMetric.__init__, "dice")

    @override
    def _ratio(self, tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
        return 2 * tp, 2 * tp + fp + fn


class TrevskyMetric(RegionBasedMetric):
    """Tversky index (Catalyst's spelling): tp / (tp + beta fp + alpha fn); keys ``trevsky`` ...

    Args:
        alpha: the weight of false negatives; with `beta` None it must lie in (0, 1) and
            ``beta = 1 - alpha``.
        beta: the weight of false positives.
        (the rest as for `IOUMetric`)

    Raises:
        ValueError: for `beta` None and `alpha` outside (0, 1).
    """

    @forwarding_signature(RegionBasedMetric.__init__, skip=2)
    def __init__(self, alpha: float, beta: float | None = None, *args: Any, **kwargs: Any) -> None:
        if beta is None:
            if not 0 < alpha < 1:
                raise ValueError(f"with beta=None, alpha must lie in (0, 1); got {alpha}")
            beta = 1 - alpha
        self.alpha, self.beta = float(alpha), float(beta)
        super().__init__("trevsky", *args, **kwargs)

    @override
    def _ratio(self, tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
        return tp, tp + self.beta * fp + self.alpha * fn
