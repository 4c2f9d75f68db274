"""Pure classification metrics on tensors, and the counting math the stateful metrics reuse.

Every function here works on whatever device its inputs live on and never moves data to the host:
no `.item()`, no `.cpu()`, no Python branching on tensor values. Counting uses `index_add_` into a
pre-sized tensor instead of `torch.bincount`, because `bincount` reads the maximum label back to the
host to size its output (a device sync on CUDA).

The input conventions (multiclass scores, binary single scores, labels, one-hot targets) and their
check live in `ddprun.metrics.inputs`; `check_shapes`, `predicted_labels` and `to_labels` are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddprun.metrics.inputs import check_num_classes, check_shapes, predicted_labels, to_labels

__all__ = [
    "accuracy",
    "add_class_counts_",
    "add_confusion_",
    "aggregate_prf",
    "check_shapes",
    "class_counts",
    "confusion_matrix",
    "precision_recall_fbeta_from_counts",
    "precision_recall_fbeta_support",
    "predicted_labels",
    "to_labels",
    "topk_correct",
]


def _num_scores(outputs: Tensor) -> int:
    """The number of ranked candidates per row: C for scores, 1 for single scores or labels."""
    return outputs.shape[1] if outputs.dim() == 2 else 1


def _check_topk(topk: Sequence[int], num_candidates: int) -> None:
    """Rejects an empty top-k list or any k outside 1..C, naming the offending k and C."""
    if len(topk) == 0:
        raise ValueError("topk must name at least one k")
    for k in topk:
        if not 1 <= k <= num_candidates:
            raise ValueError(
                f"top-k accuracy needs 1 <= k <= C, got k={k} and C={num_candidates} "
                "(outputs of shape (B,) or (B, 1) hold one score or label per row, so C=1)"
            )


def topk_correct(
    outputs: Tensor, targets: Tensor, topk: Sequence[int] = (1,), threshold: float = 0.0
) -> Tensor:
    """Counts, for each k, the rows whose target is among the k highest scores.

    Args:
        outputs: scores (B, C); or a single score / label per row, (B,) or (B, 1) (binary: only
            k=1 is valid, a float score > `threshold` predicts class 1).
        targets: labels (B,) / (B, 1), or one-hot (B, C).
        topk: the k values.
        threshold: the binary decision threshold (0.0 for logits, 0.5 for probabilities).

    Returns:
        An int64 tensor of shape (len(topk),) on the outputs' device.

    Raises:
        ValueError: on shapes `check_shapes` rejects, or a k below 1 or above C.
    """
    check_shapes(outputs, targets)
    num_candidates = _num_scores(outputs)
    _check_topk(topk, num_candidates)
    labels = to_labels(targets)
    if max(topk) == 1:
        # Top-1 only (the default): arg-max, no topk sort, cumsum or stack.
        correct = predicted_labels(outputs, threshold).eq(labels).sum()
        return correct.reshape(1) if len(topk) == 1 else correct.repeat(len(topk))
    if num_candidates == 1:
        hits = predicted_labels(outputs, threshold).eq(labels).unsqueeze(1)
    else:
        ranked = outputs.topk(max(topk), dim=1).indices
        hits = ranked.eq(labels.unsqueeze(1))
    # A target occurs at most once per row, so summing over rows and then cumulating over the
    # rank axis gives "target within the first j ranks" for every j at once.
    within = hits.sum(dim=0).cumsum(dim=0)
    # Index with Python ints (views) rather than a list: a list index becomes a host tensor
    # that has to be copied to the device.
    return torch.stack([within[k - 1] for k in topk])


def accuracy(
    outputs: Tensor, targets: Tensor, topk: Sequence[int] = (1,), threshold: float = 0.0
) -> list[Tensor]:
    """Top-k accuracy: the fraction of rows whose target is among the top-k of `outputs`.

    Args:
        outputs: scores (B, C); or a single score / label per row, (B,) or (B, 1) (binary: only
            k=1 is valid, a float score > `threshold` predicts class 1).
        targets: labels (B,) / (B, 1), or one-hot (B, C).
        topk: the k values.
        threshold: the binary decision threshold (0.0 for logits, 0.5 for probabilities).

    Returns:
        One 0-dim float tensor per k, on the outputs' device (NaN for an empty batch).

    Raises:
        ValueError: on shapes `check_shapes` rejects, or a k below 1 or above C.
    """
    correct = topk_correct(outputs, targets, topk, threshold)
    fractions = correct.to(torch.get_default_dtype()) / targets.shape[0]
    return list(fractions.unbind(0))


def add_class_counts_(
    tp: Tensor,
    fp: Tensor,
    fn: Tensor,
    support: Tensor,
    outputs: Tensor,
    targets: Tensor,
    threshold: float = 0.0,
) -> None:
    """Adds one batch's per-class true/false positives, false negatives and support in place.

    Args:
        tp: (C,) int64 true positives, updated in place.
        fp: (C,) int64 false positives, updated in place.
        fn: (C,) int64 false negatives, updated in place.
        support: (C,) int64 number of targets of each class, updated in place.
        outputs: scores (B, C), single scores (B,) / (B, 1) (binary, C must be 2) or labels (B,).
        targets: labels (B,) / (B, 1) or one-hot (B, C).
        threshold: the binary decision threshold (0.0 for logits, 0.5 for probabilities).

    Raises:
        ValueError: if the shapes do not match each other or C.
    """
    check_shapes(outputs, targets)
    check_num_classes(outputs, tp.shape[0])
    preds, labels = predicted_labels(outputs, threshold), to_labels(targets)
    correct = preds.eq(labels).to(tp.dtype)
    wrong = 1 - correct
    tp.index_add_(0, labels, correct)
    fp.index_add_(0, preds, wrong)
    fn.index_add_(0, labels, wrong)
    # An expanded scalar has no storage per element, so counting support allocates nothing.
    support.index_add_(0, labels, support.new_ones(()).expand_as(labels))


def class_counts(
    outputs: Tensor, targets: Tensor, num_classes: int, threshold: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class counts of one batch.

    Args:
        outputs: scores (B, C), single scores (B,) / (B, 1) (binary, C must be 2) or labels (B,).
        targets: labels (B,) / (B, 1) or one-hot (B, C).
        num_classes: C.
        threshold: the binary decision threshold (0.0 for logits, 0.5 for probabilities).

    Returns:
        (tp, fp, fn, support), each an int64 tensor of shape (C,).
    """
    counts = torch.zeros(4, num_classes, dtype=torch.int64, device=outputs.device)
    tp, fp, fn, support = counts.unbind(0)
    add_class_counts_(tp, fp, fn, support, outputs, targets, threshold)
    return tp, fp, fn, support


def _divide(numerator: Tensor, denominator: Tensor, zero_division: float) -> Tensor:
    """numerator / denominator, with `zero_division` wherever the denominator is 0."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.full_like(safe, zero_division))


def precision_recall_fbeta_from_counts(
    tp: Tensor,
    fp: Tensor,
    support: Tensor,
    beta: float = 1.0,
    zero_division: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Precision, recall and F-beta from counts, with scikit-learn's zero-division rules.

    Precision is `zero_division` for a class never predicted, recall for a class never in the
    targets, and F-beta only when the class is neither; F-beta is written in counts,
    (1 + b^2) tp / (b^2 support + predicted), so a class predicted but absent gets 0 as in sklearn.

    Args:
        tp: true positives (any shape; per class or summed).
        fp: false positives, same shape.
        support: targets of the class (tp + fn), same shape.
        beta: weight of recall in the F-score.
        zero_division: value for a 0/0 ratio (0 or 1).

    Returns:
        (precision, recall, fbeta) as float64 tensors of the counts' shape.
    """
    tp, support = tp.double(), support.double()
    predicted = tp + fp.double()
    precision = _divide(tp, predicted, zero_division)
    recall = _divide(tp, support, zero_division)
    if beta == float("inf"):
        return precision, recall, recall
    beta2 = beta * beta
    fbeta = _divide((1 + beta2) * tp, beta2 * support + predicted, zero_division)
    return precision, recall, fbeta


def aggregate_prf(
    tp: Tensor,
    fp: Tensor,
    support: Tensor,
    beta: float = 1.0,
    zero_division: float = 0.0,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Micro, macro and support-weighted averages of precision, recall and F-beta over classes.

    Matches scikit-learn's `average="micro" | "macro" | "weighted"` with `labels=range(C)`: macro is
    the plain mean over all C classes, empty ones included. When no class has any support (no data
    at all) the weighted averages are `zero_division`.

    Args:
        tp: (C,) true positives.
        fp: (C,) false positives.
        support: (C,) targets per class.
        beta: weight of recall in the F-score.
        zero_division: value for a 0/0 ratio (0 or 1).

    Returns:
        `{"micro": (p, r, f), "macro": (p, r, f), "weighted": (p, r, f)}` of 0-dim float64 tensors.
    """
    per_class = precision_recall_fbeta_from_counts(tp, fp, support, beta, zero_division)
    micro = precision_recall_fbeta_from_counts(
        tp.sum(), fp.sum(), support.sum(), beta, zero_division
    )
    weights = support.double()
    total = weights.sum()
    weighted = tuple(_divide((value * weights).sum(), total, zero_division) for value in per_class)
    macro = tuple(value.mean() for value in per_class)
    return {"micro": micro, "macro": macro, "weighted": weighted}


def precision_recall_fbeta_support(
    outputs: Tensor,
    targets: Tensor,
    num_classes: int,
    beta: float = 1.0,
    zero_division: float = 0.0,
    threshold: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class precision, recall, F-beta and support of one set of predictions.

    Equals scikit-learn's `precision_recall_fscore_support(average=None, labels=range(C))`. For
    single-score outputs pass num_classes=2: class 1 is predicted where score > `threshold`, and
    class 1's values are scikit-learn's `average="binary"` ones.

    Args:
        outputs: scores (B, C), single scores (B,) / (B, 1) (binary, C must be 2) or labels (B,).
        targets: labels (B,) / (B, 1) or one-hot (B, C).
        num_classes: C.
        beta: weight of recall in the F-score.
        zero_division: value for a 0/0 ratio (0 or 1).
        threshold: the binary decision threshold (0.0 for logits, 0.5 for probabilities).

    Returns:
        (precision, recall, fbeta) as (C,) float64 tensors and support as a (C,) int64 tensor
        (the number of targets of each class).
    """
    tp, fp, _, support = class_counts(outputs, targets, num_classes, threshold)
    precision, recall, fbeta = precision_recall_fbeta_from_counts(
        tp, fp, support, beta, zero_division
    )
    return precision, recall, fbeta, support


def add_confusion_(
    matrix: Tensor, outputs: Tensor, targets: Tensor, threshold: float = 0.0
) -> None:
    """Adds one batch to a (C, C) confusion matrix in place (rows = target, columns = prediction).

    Args:
        matrix: (C, C) count tensor, updated in place; must be contiguous.
        outputs: scores (B, C), single scores (B,) / (B, 1) (binary, C must be 2) or labels (B,).
        targets: labels (B,) / (B, 1) or one-hot (B, C).
        threshold: the binary decision threshold (0.0 for logits, 0.5 for probabilities).

    Raises:
        ValueError: if the shapes do not match each other or C.
    """
    num_classes = matrix.shape[0]
    check_shapes(outputs, targets)
    check_num_classes(outputs, num_classes)
    cells = to_labels(targets) * num_classes + predicted_labels(outputs, threshold)
    flat = matrix.view(-1)
    flat.index_add_(0, cells, flat.new_ones(()).expand_as(cells))


def confusion_matrix(
    outputs: Tensor, targets: Tensor, num_classes: int, threshold: float = 0.0
) -> Tensor:
    """The confusion matrix of one set of predictions.

    Args:
        outputs: scores (B, C), single scores (B,) / (B, 1) (binary, C must be 2) or labels (B,).
        targets: labels (B,) / (B, 1) or one-hot (B, C).
        num_classes: C.
        threshold: the binary decision threshold (0.0 for logits, 0.5 for probabilities).

    Returns:
        A (C, C) int64 tensor of counts; rows are targets, columns are predictions.
    """
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=outputs.device)
    add_confusion_(matrix, outputs, targets, threshold)
    return matrix
