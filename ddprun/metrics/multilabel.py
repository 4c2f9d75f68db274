"""`MultilabelAccuracyMetric`: the share of (sample, class) decisions that are right, over a loader.

Counts, not means of batch means: the correct decisions and the decisions made are int64 "sum"
states, so the loader value is exact across ranks whatever the batch sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from ddprun.metrics._support import affix
from ddprun.metrics.metric import Metric

__all__ = ["MultilabelAccuracyMetric", "is_class_index", "multilabel_targets"]


def is_class_index(targets: Tensor, batch: int, columns: int) -> bool:
    """Whether `targets` are class indices for (batch, columns) scores: (B,) or (B, 1), C > 1."""
    shape = tuple(targets.shape)
    return columns > 1 and shape in ((batch,), (batch, 1))


def multilabel_targets(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """`outputs` and `targets` as (B, C) pairs, as Catalyst 21.12 reads multilabel inputs.

    Outputs (B,) become (B, 1). Targets (B,) (or (B, 1)) are class indices when outputs have
    C > 1 columns (one-hot encoded here; an index outside [0, C) gives an all-zero row) and 0/1
    labels when C == 1; targets (B, C) are taken as they are.

    Raises:
        ValueError: when the shapes fit none of these cases (both shapes are named).
    """
    if outputs.dim() == 1:
        outputs = outputs.unsqueeze(1)
    if outputs.dim() != 2:
        raise ValueError(
            f"multilabel outputs must be (B,) or (B, C) scores, got shape {tuple(outputs.shape)}"
        )
    batch, columns = outputs.shape
    if is_class_index(targets, batch, columns) or tuple(targets.shape) == (batch,):
        if columns == 1:
            return outputs, targets.view(batch, 1)
        classes = torch.arange(columns, device=targets.device)
        return outputs, targets.long().view(batch, 1) == classes
    if targets.dim() == 2 and tuple(targets.shape) == (batch, columns):
        return outputs, targets
    raise ValueError(
        f"multilabel targets of shape {tuple(targets.shape)} do not fit outputs of shape "
        f"{tuple(outputs.shape)}: expected (B, C) 0/1 targets, or (B,) class indices"
    )


class MultilabelAccuracyMetric(Metric):
    """Owns the number of right 0/1 decisions and of decisions over a loader (key ``accuracy``).

    A decision is right where ``(output > threshold) == target``; the loader value is
    right / decisions over all (sample, class) pairs of all ranks, as scikit-learn's
    ``accuracy_score(Y.ravel(), P.ravel())``. The per-batch value (`update`) is the batch's share.

    Args:
        threshold: a float, or a (C,) tensor of per-class thresholds (0.5 for probabilities;
            pass 0.0 for logits).
        compute_on_call: whether calling the metric returns `compute()`.
        prefix, suffix: put around the key, as in Catalyst (``{prefix}accuracy{suffix}``).
    """

    def __init__(
        self,
        threshold: float | Tensor = 0.5,
        compute_on_call: bool = True,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        self.threshold = threshold.detach() if isinstance(threshold, Tensor) else float(threshold)
        self.key = affix("accuracy", prefix, suffix)
        self.add_state("correct", torch.zeros((), dtype=torch.int64), "sum")
        self.add_state("total", torch.zeros((), dtype=torch.int64), "sum")

    @override
    def to(self, device: torch.device | str) -> MultilabelAccuracyMetric:
        """Moves the states (and a tensor threshold) to `device`."""
        super().to(device)
        if isinstance(self.threshold, Tensor):
            self.threshold = self.threshold.to(self.device)
        return self

    @override
    def update(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Adds one batch's counts in place, without a host sync.

        Args:
            outputs: scores (B, C) or (B,).
            targets: 0/1 targets (B, C) (int, bool or float), or class indices (B,).

        Returns:
            The batch's accuracy, a 0-dim float tensor on the outputs' device.
        """
        outputs, targets = multilabel_targets(outputs.detach(), targets.detach())
        right = (outputs > self.threshold).eq(targets.bool()).sum()
        self.correct.add_(right)
        self.total.add_(targets.numel())
        return right / targets.numel()

    def update_key_value(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """`update`, keyed as in `compute_key_value` (for batch metrics)."""
        return {self.key: self.update(outputs, targets)}

    @override
    def compute(self) -> float:
        """Right decisions over all decisions (NaN before any update)."""
        total = int(self.total)
        return float(self.correct) / total if total else float("nan")

    @override
    def compute_key_value(self) -> dict[str, float]:
        """``{"accuracy": ...}`` (with the prefix and suffix)."""
        return {self.key: self.compute()}
