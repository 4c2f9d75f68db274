"""ROC-AUC over a whole loader: every score is kept, gathered once across ranks, then ranked.

`AUCMetric` keeps the loader's scores (float64) and 0/1 targets as 1-D "cat" states plus a "sum"
row count, so the loader end costs the one sum all-reduce and one all-gather that every "cat"
state shares. Ranks split an evaluation loader without padding, so the gathered rows are
exactly the dataset's rows (in another order, which the AUC does not depend on: ties between
scores are scored as scikit-learn scores them, each distinct score being one threshold).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from typing_extensions import override

from ddprun.metrics._support import GrowingMetric, affix
from ddprun.metrics.multilabel import is_class_index, multilabel_targets

__all__ = ["AUCMetric", "AUCResult", "binary_auc"]


def binary_auc(scores: Tensor, targets: Tensor) -> float:
    """The area under the ROC curve of 1-D `scores` for 0/1 `targets` (NaN without both classes).

    Equal scores form one threshold (the curve goes diagonally through their positives and
    negatives), so the value does not depend on the order of the samples and equals
    ``sklearn.metrics.roc_auc_score``.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    ranked = scores[order]
    hits = targets[order].double()
    tps, fps = hits.cumsum(0), (1 - hits).cumsum(0)
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[1:] != ranked[:-1]
    tps, fps = tps[last_of_tie], fps[last_of_tie]
    if tps.numel() == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    zero = tps.new_zeros(1)
    tpr, fpr = torch.cat([zero, tps / tps[-1]]), torch.cat([zero, fps / fps[-1]])
    return float(torch.trapezoid(tpr, fpr))


class AUCResult(NamedTuple):
    """What `AUCMetric.compute()` returns.

    Attributes:
        per_class: (C,) float64 AUC per column (NaN where a column lacks positives or negatives).
        micro: the AUC of all (sample, column) pairs pooled.
        macro: the mean of the defined per-column values.
        weighted: their mean weighted by each column's number of positives.
    """

    per_class: Tensor
    micro: float
    macro: float
    weighted: float


class AUCMetric(GrowingMetric):
    """Owns a loader's scores and targets for ROC-AUC, exact across ranks.

    Inputs as in Catalyst 21.12: scores (B, C) with (B, C) 0/1 targets (multilabel or one-hot),
    or with (B,) class indices (one-vs-rest per class); binary scores (B,) or (B, 1) with (B,)
    0/1 targets. Any monotone scores work (logits or probabilities).

    Keys: ``auc`` (macro), ``auc/_micro``, ``auc/_macro``, ``auc/_weighted`` and, with
    `compute_per_class_metrics`, ``auc/class_00`` ...; prefix and suffix as in Catalyst
    (``{prefix}auc{suffix}/_micro``).

    Decisions where Catalyst 21.12 differs: ties are scored as scikit-learn does (Catalyst's
    value depended on the order of tied samples, so on how ranks split the data); ``_weighted``
    weights by positives normalised to sum 1 (scikit-learn's ``average="weighted"``; Catalyst's
    weights did not sum to 1 for multilabel or binary targets); a column without positives or
    without negatives is NaN and left out of the macro and weighted means (scikit-learn raises).
    A target that is neither 0/1 nor a class index in [0, C) raises a ValueError at compute
    (counted on the device per batch, so `update` stays free of host syncs).

    Args:
        compute_on_call: whether calling the metric returns `compute()`.
        compute_per_class_metrics: also report ``auc/class_NN``.
        prefix, suffix: put around the key.
    """

    def __init__(
        self,
        compute_on_call: bool = True,
        compute_per_class_metrics: bool = False,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        self.compute_per_class_metrics = compute_per_class_metrics
        self.prefix, self.suffix = prefix, suffix
        self.add_state("scores", torch.zeros(0, dtype=torch.float64), "cat")
        self.add_state("targets", torch.zeros(0, dtype=torch.bool), "cat")
        self.add_state("rows", torch.zeros((), dtype=torch.int64), "sum")
        self.add_state("invalid", torch.zeros((), dtype=torch.int64), "sum")
        self._columns: int | None = None

    @override
    def reset(self) -> None:
        """Forgets every score and target."""
        super().reset()
        self._columns = None

    @override
    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Appends one batch, without a host sync.

        Raises:
            ValueError: when the shapes do not fit each other, or the number of score columns
                changes within a loader.
        """
        raw_targets = targets.detach()
        scores, targets = multilabel_targets(scores.detach(), raw_targets)
        columns = scores.shape[1]
        if self._columns is not None and columns != self._columns:
            raise ValueError(
                f"AUCMetric: scores have {columns} columns, earlier batches of this loader had "
                f"{self._columns}"
            )
        self._columns = columns
        if is_class_index(raw_targets, scores.shape[0], columns):  # count the out-of-range
            labels = raw_targets.long()
            self.invalid.add_(((labels < 0) | (labels >= columns)).sum())
        else:
            self.invalid.add_(((targets != 0) & (targets != 1)).sum())
        self.append("scores", scores)
        self.append("targets", targets != 0)
        self.rows.add_(scores.shape[0])

    @override
    def compute(self) -> AUCResult:
        """Per-column, micro, macro and weighted AUC over every row seen (NaN without rows).

        Raises:
            ValueError: if some target was neither 0/1 nor a class index within the columns.
        """
        invalid, rows = int(self.invalid), int(self.rows)
        if invalid:
            raise ValueError(
                f"AUCMetric: {invalid} target value(s) were neither 0/1 nor a class index in "
                "[0, number of score columns)"
            )
        if rows == 0:
            nan = float("nan")
            return AUCResult(torch.zeros(0, dtype=torch.float64), nan, nan, nan)
        scores = self.scores.view(rows, -1).cpu()
        targets = self.targets.view(rows, -1).cpu()
        per_class = torch.tensor(
            [binary_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])],
            dtype=torch.float64,
        )
        defined = ~per_class.isnan()
        support = targets.sum(dim=0).double()[defined]
        macro = float(per_class[defined].mean()) if defined.any() else math.nan
        weighted = (
            float((per_class[defined] * support).sum() / support.sum())
            if defined.any() and support.sum() > 0
            else math.nan
        )
        micro = binary_auc(scores.reshape(-1), targets.reshape(-1))
        return AUCResult(per_class, micro, macro, weighted)

    @override
    def compute_key_value(self) -> dict[str, float]:
        """Per-column keys (when asked for), then ``auc/_micro``, ``auc``, ``auc/_macro``,
        ``auc/_weighted``."""
        result = self.compute()
        output = {}
        if self.compute_per_class_metrics:
            for column, value in enumerate(result.per_class.tolist()):
                output[self._key(f"auc/class_{column:02d}")] = value
        output[self._key("auc/_micro")] = result.micro
        output[self._key("auc")] = result.macro
        output[self._key("auc/_macro")] = result.macro
        output[self._key("auc/_weighted")] = result.weighted
        return output

    def _key(self, key: str) -> str:
        return affix(key, self.prefix, self.suffix)
