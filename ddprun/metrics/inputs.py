"""How classification metrics read their inputs: the shape conventions, their check, and labels.

Shared by `ddprun.metrics.functional` and the stateful metrics. The checks read shapes only (Python
ints) and the label functions stay on the inputs' device: no host sync.

Input conventions (every function of `ddprun.metrics.functional` follows them; `check_shapes`
enforces them):

- Multiclass: `outputs` of shape (B, C) with C >= 2 are scores (logits or probabilities); the
  prediction is the arg-max. `targets` are class indices of shape (B,) or (B, 1), or one-hot (or
  soft) (B, C) rows whose arg-max is the label.
- Binary: floating `outputs` of shape (B,) or (B, 1) are one score per sample; the prediction is
  class 1 where the score is strictly greater than `threshold` (default 0.0, right for logits as
  fed to `BCEWithLogitsLoss`; pass 0.5 for probabilities). `targets` are 0/1 labels of shape (B,)
  or (B, 1), int or float. Float scores are never truncated to class ids.
- Integer or bool `outputs` of shape (B,) or (B, 1) are predicted labels, used as they are.
- Floating targets of shape (B,) or (B, 1) are rounded to the nearest integer (so label-smoothed
  0.05/0.95 give 0/1). Only shapes are checked, never values (that would be a host sync).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_num_classes", "check_shapes", "predicted_labels", "to_labels"]


def _shape_error(outputs: Tensor, targets: Tensor, why: str) -> ValueError:
    """A ValueError naming both shapes, what is wrong and what `check_shapes` accepts."""
    return ValueError(
        f"outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} "
        f"{why}; expected outputs (B, C) with targets (B,), (B, 1) or (B, C) (multiclass), or "
        "single-score outputs (B,) or (B, 1) with 0/1 targets (B,) or (B, 1) (binary)"
    )


def check_shapes(outputs: Tensor, targets: Tensor) -> None:
    """Rejects an outputs/targets pair that fits neither the multiclass nor the binary convention.

    Reads only shapes (Python ints): no device work, no host sync, no string built unless raising.

    Raises:
        ValueError: naming both shapes and what was expected, when a tensor is not 1- or
            2-dimensional, the batch sizes differ, a (B, C) target goes with single-score outputs
            (one-hot? multi-label? ambiguous), or one-hot targets have another C.
    """
    # One read of each torch.Size (a tuple), then plain tuple work: under 1 us per batch.
    out, tgt = outputs.shape, targets.shape
    if not (1 <= len(out) <= 2 and 1 <= len(tgt) <= 2):
        raise _shape_error(outputs, targets, "are not 1- or 2-dimensional")
    if out[0] != tgt[0]:
        raise _shape_error(outputs, targets, "have different batch sizes")
    if out[1:] == (0,):
        raise _shape_error(outputs, targets, "have no score column")
    if len(tgt) == 2 and tgt[1] > 1:
        if out[1:] in ((), (1,)):
            raise _shape_error(
                outputs,
                targets,
                "are ambiguous (single scores with multi-column targets; for one-hot binary "
                "targets give (B, 2) scores)",
            )
        if tgt[1] != out[1]:
            raise _shape_error(outputs, targets, "have different numbers of classes")


def predicted_labels(outputs: Tensor, threshold: float = 0.0) -> Tensor:
    """The predicted class of each row as a flat int64 vector.

    Args:
        outputs: scores (B, C) with C >= 2 (arg-max); floating single scores (B,) or (B, 1)
            (class 1 where score > `threshold`); or integer/bool labels (B,) or (B, 1) (as they are).
        threshold: the binary decision threshold: 0.0 for logits, 0.5 for probabilities.

    Returns:
        An int64 tensor of shape (B,).
    """
    if outputs.dim() == 2 and outputs.shape[1] > 1:
        return outputs.argmax(dim=1)
    flat = outputs.reshape(-1)
    if flat.is_floating_point():
        return flat.gt(threshold).long()
    return flat.long()


def to_labels(tensor: Tensor) -> Tensor:
    """Targets as a flat int64 label vector (for outputs use `predicted_labels`).

    (B, C) rows (one-hot or soft) give their arg-max; (B,) or (B, 1) labels are flattened, float
    ones rounded to the nearest integer.
    """
    if tensor.dim() == 2 and tensor.shape[1] > 1:
        return tensor.argmax(dim=1)
    if tensor.dim() > 2:
        raise ValueError(
            f"expected a tensor of shape (B,), (B, 1) or (B, C); got {tuple(tensor.shape)}"
        )
    flat = tensor.reshape(-1)
    return flat.round().long() if flat.is_floating_point() else flat.long()


def check_num_classes(outputs: Tensor, num_classes: int) -> None:
    """Rejects scores whose column count is not `num_classes`, and single scores unless it is 2."""
    columns = outputs.shape[1:]
    if columns not in ((), (1,)):
        if columns != (num_classes,):
            raise ValueError(
                f"outputs of shape {tuple(outputs.shape)} score {columns[0]} classes, "
                f"but num_classes={num_classes}; expected (B, {num_classes}) outputs"
            )
    elif num_classes != 2 and outputs.is_floating_point():
        raise ValueError(
            f"single-score outputs of shape {tuple(outputs.shape)} are binary (classes 0 and 1), "
            f"so num_classes must be 2; got num_classes={num_classes}"
        )
