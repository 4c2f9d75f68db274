"""Stateful classification metrics: top-k accuracy, per-class precision/recall/F1, confusion matrix.

All states are int64 counts reduced by "sum", so `ddprun.metrics.sync.synchronized` makes them exact
across ranks, and the math is the one in `ddprun.metrics.functional`.

Binary models: single-score outputs (B,) or (B, 1) with 0/1 targets (B,) or (B, 1) predict class 1
where the score is > `threshold` (default 0.0, for logits; pass 0.5 for probabilities). Accuracy is
then the binary accuracy, and the precision/recall/F1 and confusion-matrix metrics take
`num_classes=2` (class 1's values are scikit-learn's `average="binary"` ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from typing_extensions import override

from ddprun.metrics import functional as F
from ddprun.metrics.metric import Metric

__all__ = [
    "AccuracyMetric",
    "ConfusionMatrixMetric",
    "MulticlassPrecisionRecallF1SupportMetric",
    "PrecisionRecallF1Support",
]


def _counts(*shape: int) -> Tensor:
    """A zero int64 count tensor of the given shape."""
    return torch.zeros(shape, dtype=torch.int64)


def _check_num_classes(num_classes: int) -> None:
    """Rejects a class count below 1."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


class AccuracyMetric(Metric):
    """Owns exact top-k accuracy over a loader: correct counts per k and the number of samples.

    Args:
        topk: the k values; keys are `accuracy01`, `accuracy03`, ... (two-digit k). Single-score
            (binary) outputs allow only k=1.
        compute_on_call: whether calling the metric returns `compute()`.
        threshold: the binary decision threshold for single-score outputs (0.0 for logits, 0.5
            for probabilities); unused for (B, C) scores.
    """

    def __init__(
        self, topk: Sequence[int] = (1,), compute_on_call: bool = True, threshold: float = 0.0
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        if len(topk) == 0 or min(topk) < 1:
            raise ValueError(f"topk must be a non-empty sequence of k >= 1, got {tuple(topk)}")
        self.topk = tuple(topk)
        self._top1 = self.topk == (1,)
        self.threshold = float(threshold)
        self.add_state("correct", _counts(len(self.topk)), "sum")
        self.add_state("total", _counts(), "sum")

    @property
    def keys(self) -> list[str]:
        """The metric keys, one per k, in `topk` order."""
        return [f"accuracy{k:02d}" for k in self.topk]

    @override
    def update(self, outputs: Tensor, targets: Tensor) -> list[Tensor]:
        """Adds one batch, without a host sync.

        Args:
            outputs: scores (B, C); or single scores / labels (B,) or (B, 1) (binary, k=1 only).
            targets: labels (B,) / (B, 1) or one-hot (B, C).

        Returns:
            This batch's accuracy per k, as 0-dim float tensors on the outputs' device.

        Raises:
            ValueError: if the shapes do not match (see `ddprun.metrics.functional.check_shapes`).
        """
        return batch_accuracies(self.add_counts(outputs, targets), targets.shape[0])

    def add_counts(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """`update` without the batch's accuracies (one tensor op less per batch): returns the
        batch's correct count (0-dim for the top-1 fast path, else one per k). `outputs` may
        carry a graph: only an arg-max (not differentiable) reads it as it is."""
        count = targets.shape[0]
        if (
            self._top1
            and outputs.dim() == 2
            and outputs.shape[1] > 1
            and outputs.shape[0] == count
            and targets.dim() == 1
            and not targets.is_floating_point()
        ):
            # The common case (scores and class indices, top-1) in four small ops: each costs
            # a few microseconds more once a large model has pushed the dispatcher out of cache.
            correct = outputs.argmax(dim=1).eq(targets).sum()
            self.correct.add_(correct)
            pending = self._pending  # count_later("total", count), without the call
            pending["total"] = pending.get("total", 0) + count
            return correct
        correct = F.topk_correct(outputs.detach(), targets, self.topk, self.threshold)
        self.correct.add_(correct)
        self.count_later("total", count)
        return correct

    def update_key_value(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """`update`, with the batch's accuracies keyed as in `compute_key_value` (for batch metrics)."""
        return dict(zip(self.keys, self.update(outputs, targets)))

    @override
    def compute(self) -> list[float]:
        """The accuracy per k over every sample seen (NaN before any update)."""
        self.fold_pending()
        return (self.correct.double() / self.total).tolist()

    @override
    def compute_key_value(self) -> dict[str, float]:
        """`{"accuracy01": ..., "accuracy03": ...}` for the configured k values."""
        return dict(zip(self.keys, self.compute()))


def batch_accuracies(correct: Tensor, count: int) -> list[Tensor]:
    """One batch's accuracy per k (0-dim tensors in the default float dtype) from the correct
    counts `AccuracyMetric.add_counts` returned for its `count` samples."""
    if correct.dim() == 0:
        return [correct / count]
    return list((correct.to(torch.get_default_dtype()) / count).unbind(0))


class PrecisionRecallF1Support(NamedTuple):
    """What `MulticlassPrecisionRecallF1SupportMetric.compute()` returns (float64 tensors).

    Attributes:
        per_class: (precision, recall, f1, support), each of shape (C,).
        micro: (precision, recall, f1) over all samples pooled, 0-dim each.
        macro: (precision, recall, f1), plain means over the C classes.
        weighted: (precision, recall, f1), means weighted by support.
    """

    per_class: tuple[Tensor, Tensor, Tensor, Tensor]
    micro: tuple[Tensor, Tensor, Tensor]
    macro: tuple[Tensor, Tensor, Tensor]
    weighted: tuple[Tensor, Tensor, Tensor]


class MulticlassPrecisionRecallF1SupportMetric(Metric):
    """Owns per-class true positives, false positives, false negatives and support over a loader.

    Values equal scikit-learn's `precision_recall_fscore_support(labels=range(num_classes))` for
    `average=None`, "micro", "macro" and "weighted" with the same `zero_division`, including
    classes that never occur in the targets or the predictions.

    Args:
        num_classes: C (2 for single-score binary outputs).
        zero_division: the value of a 0/0 ratio, 0 or 1.
        compute_on_call: whether calling the metric returns `compute()`.
        threshold: the binary decision threshold for single-score outputs (0.0 for logits, 0.5
            for probabilities); unused for (B, C) scores.
    """

    def __init__(
        self,
        num_classes: int,
        zero_division: float = 0,
        compute_on_call: bool = True,
        threshold: float = 0.0,
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        _check_num_classes(num_classes)
        if zero_division not in (0, 1):
            raise ValueError(f"zero_division must be 0 or 1, got {zero_division!r}")
        self.num_classes = num_classes
        self.zero_division = float(zero_division)
        self.threshold = float(threshold)
        for name in ("tp", "fp", "fn", "support"):
            self.add_state(name, _counts(num_classes), "sum")

    @override
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Adds one batch's per-class counts in place, without a host sync.

        Args:
            outputs: scores (B, C), single scores (B,) / (B, 1) (binary) or labels (B,).
            targets: labels (B,) / (B, 1) or one-hot (B, C).

        Raises:
            ValueError: if the shapes do not match each other or `num_classes`.
        """
        F.add_class_counts_(
            self.tp, self.fp, self.fn, self.support, outputs, targets, self.threshold
        )

    @override
    def compute(self) -> PrecisionRecallF1Support:
        """Per-class values and their micro, macro and weighted averages."""
        per_class = F.precision_recall_fbeta_from_counts(
            self.tp, self.fp, self.support, zero_division=self.zero_division
        )
        averages = F.aggregate_prf(self.tp, self.fp, self.support, zero_division=self.zero_division)
        return PrecisionRecallF1Support(
            per_class=(*per_class, self.support.double()),
            micro=averages["micro"],
            macro=averages["macro"],
            weighted=averages["weighted"],
        )

    @override
    def compute_key_value(self) -> dict[str, float]:
        """`precision/_micro` ... `f1/_weighted`, then `precision/class_00` ... `support/class_NN`."""
        result = self.compute()
        keys: list[str] = []
        values: list[Tensor] = []
        for average in ("micro", "macro", "weighted"):
            for name, value in zip(("precision", "recall", "f1"), getattr(result, average)):
                keys.append(f"{name}/_{average}")
                values.append(value.reshape(1))
        for name, value in zip(("precision", "recall", "f1", "support"), result.per_class):
            keys.extend(f"{name}/class_{c:02d}" for c in range(self.num_classes))
            values.append(value)
        # One transfer to the host for every value instead of one per key.
        return dict(zip(keys, torch.cat(values).tolist()))


class ConfusionMatrixMetric(Metric):
    """Owns a loader's (C, C) confusion matrix: rows are targets, columns are predictions.

    The matrix is not a scalar, so `compute_key_value()` returns an empty dict; callers read
    `compute()` (the confusion-matrix callback logs it as an image).

    Args:
        num_classes: C (2 for single-score binary outputs).
        normalize: whether `compute()` divides each row by its number of samples (rows without
            samples stay 0).
        compute_on_call: whether calling the metric returns `compute()`.
        threshold: the binary decision threshold for single-score outputs (0.0 for logits, 0.5
            for probabilities); unused for (B, C) scores.
    """

    def __init__(
        self,
        num_classes: int,
        normalize: bool = False,
        compute_on_call: bool = True,
        threshold: float = 0.0,
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.normalize = normalize
        self.threshold = float(threshold)
        self.add_state("matrix", _counts(num_classes, num_classes), "sum")

    @override
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Adds one batch in place, without a host sync.

        Args:
            outputs: scores (B, C), single scores (B,) / (B, 1) (binary) or labels (B,).
            targets: labels (B,) / (B, 1) or one-hot (B, C).

        Raises:
            ValueError: if the shapes do not match each other or `num_classes`.
        """
        F.add_confusion_(self.matrix, outputs, targets, self.threshold)

    @override
    def compute(self) -> Tensor:
        """The int64 counts, or float64 row-normalised frequencies when `normalize` is set."""
        if not self.normalize:
            return self.matrix.clone()
        counts = self.matrix.double()
        return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)

    @override
    def compute_key_value(self) -> dict[str, float]:
        """An empty dict: a matrix is no scalar metric (see `compute()`)."""
        return {}
