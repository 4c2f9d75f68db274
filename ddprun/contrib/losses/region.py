"""Region losses for segmentation: ``IoULoss``, ``DiceLoss``, ``TrevskyLoss`` (Catalyst 21.12's
names and arguments).

Each is ``1 - score`` of soft counts over every dimension but the class one::

    tp = sum(outputs * targets)   fp = sum(outputs * (1 - targets))   fn = sum(targets * (1 - outputs))
    IoU     = tp / (tp + fp + fn)
    Dice    = 2 tp / (2 tp + fp + fn)
    Trevsky = tp / (tp + beta * fp + alpha * fn)

``eps`` is added to every denominator, and to the numerator of a class with
``tp + fp + fn == 0`` (nothing predicted, nothing there: score 1, loss 0). ``mode`` joins the
classes: ``"micro"`` sums the counts of all classes first, ``"macro"`` averages the per-class
scores, ``"weighted"`` sums them times ``weights``. ``outputs`` are probabilities (not logits:
apply a sigmoid first), shaped like ``targets``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DiceLoss", "IoULoss", "TrevskyLoss"]

_MODES = ("micro", "macro", "weighted")


class _RegionLoss(nn.Module):
    """``1 - score(tp, fp, fn)`` joined over classes by ``mode``; subclasses give ``_score``."""

    def __init__(
        self,
        class_dim: int = 1,
        mode: str = "macro",
        weights: Sequence[float] | None = None,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if mode not in _MODES:
            raise ValueError(f"{name}: mode must be one of {_MODES}, got {mode!r}")
        if mode == "weighted" and weights is None:
            raise ValueError(f"{name}: mode='weighted' needs weights (one per class)")
        self.class_dim, self.mode, self.eps = class_dim, mode, eps
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def _score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Returns the scalar loss of probabilities ``outputs`` against binary ``targets``."""
        if outputs.shape != targets.shape:
            raise ValueError(
                f"{type(self).__name__}: outputs {tuple(outputs.shape)} and targets "
                f"{tuple(targets.shape)} must have the same shape"
            )
        targets = targets.to(outputs.dtype)
        class_dim = self.class_dim % outputs.dim()
        dims = [d for d in range(outputs.dim()) if d != class_dim]
        tp = (outputs * targets).sum(dims)
        fp = (outputs * (1 - targets)).sum(dims)
        fn = (targets * (1 - outputs)).sum(dims)
        if self.mode == "micro":
            return 1 - self._score(tp.sum(), fp.sum(), fn.sum())
        per_class = self._score(tp, fp, fn)
        if self.mode == "macro":
            return 1 - per_class.mean()
        weights = self.weights
        if weights is None or weights.numel() != per_class.numel():
            count = None if weights is None else weights.numel()
            raise ValueError(
                f"{type(self).__name__}: {count} weights for {per_class.numel()} classes "
                f"(dim {self.class_dim} of the outputs)"
            )
        return 1 - (weights.to(per_class.device, per_class.dtype) * per_class).sum()

    def _empty(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        """``eps`` where a class has nothing predicted and nothing there, else 0."""
        return self.eps * ((tp + fp + fn) == 0).to(tp.dtype)


class IoULoss(_RegionLoss):
    """``1 - IoU`` (Jaccard). Args: see the module docstring."""

    def _score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        return (tp + self._empty(tp, fp, fn)) / (tp + fp + fn + self.eps)


class DiceLoss(_RegionLoss):
    """``1 - Dice``. Args: see the module docstring."""

    def _score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        return (2 * tp + self._empty(tp, fp, fn)) / (2 * tp + fp + fn + self.eps)


class TrevskyLoss(_RegionLoss):
    """``1 - Trevsky`` (Tversky) index.

    Args:
        alpha: weight of false negatives.
        beta: weight of false positives; ``1 - alpha`` when None.
        class_dim, mode, weights, eps: see the module docstring.
    """

    def __init__(
        self,
        alpha: float,
        beta: float | None = None,
        class_dim: int = 1,
        mode: str = "macro",
        weights: Sequence[float] | None = None,
        eps: float = 1e-7,
    ) -> None:
        super().__init__(class_dim=class_dim, mode=mode, weights=weights, eps=eps)
        self.alpha = alpha
        self.beta = 1 - alpha if beta is None else beta

    def _score(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        empty = self._empty(tp, fp, fn)
        return (tp + empty) / (tp + self.beta * fp + self.alpha * fn + self.eps)
