"""`AdditiveMetric`: a sample-weighted running mean and std of per-batch values (loss and the like)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from typing_extensions import override

from ddprun.metrics.metric import Metric

__all__ = ["AdditiveMetric", "AdditiveValueMetric"]


class AdditiveMetric(Metric):
    """Owns the running mean and standard deviation of a value reported once per batch.

    Each `update(value, num_samples)` counts `value` as if it had been observed `num_samples`
    times. The states are plain sums -- sum(v * n), sum(v^2 * n) and sum(n), in float64 -- so the
    sync layer combines ranks exactly with one sum all-reduce, and N ranks give the statistics of
    all their batches together.

    The std is the unbiased (Bessel-corrected) std over the expanded samples:
    sqrt((sum(v^2 n) - sum(v n)^2 / N) / (N - 1)) with N = sum(n). It is 0 when N <= 1 (as for
    Catalyst's first update); mean and std are both NaN before any update. Computing the variance
    from sums loses precision only when the std is ~1e-8 of the mean or smaller.

    Args:
        compute_on_call: whether calling the metric returns `compute()`.
        metric_key: the key of `compute_key_value()`'s output (required there).
        with_std: keep the square sum for the std; without it the std is NaN and each update is
            one op less (the runner's per-key batch averages only read the mean).
    """

    def __init__(
        self, compute_on_call: bool = True, metric_key: str | None = None, with_std: bool = True
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        self.metric_key = metric_key
        self.with_std = with_std
        zero = torch.zeros((), dtype=torch.float64)
        self.add_state("weighted_sum", zero, "sum")
        if with_std:
            self.add_state("weighted_square_sum", zero, "sum")
        self.add_state("num_samples", zero, "sum")

    @override
    def update(self, value: Tensor | float, num_samples: int) -> None:
        """Adds one batch's value, weighted by its number of samples, without a host sync.

        Args:
            value: a Python number or a one-element tensor (detached here, so a loss that still
                carries its graph is fine); tensors should be on the metric's device.
            num_samples: how many samples `value` stands for (usually the batch size).
        """
        pending = self._pending  # count_later(...): a host int, no tensor op per batch
        pending["num_samples"] = pending.get("num_samples", 0) + num_samples
        if isinstance(value, Tensor):
            # In-place ops promote into the float64 states: no conversion copy per batch.
            value = value.detach()
            if value.dim():
                value = value.reshape(())
            self.weighted_sum.add_(value, alpha=num_samples)
            if self.with_std:
                self.weighted_square_sum.addcmul_(value, value, value=num_samples)
        else:
            # Plain numbers stay on the host side of the arithmetic: no tensor is created.
            self.weighted_sum.add_(value * num_samples)
            if self.with_std:
                self.weighted_square_sum.add_(value * value * num_samples)

    @override
    def compute(self) -> tuple[float, float]:
        """The (mean, std) over all samples seen; (NaN, NaN) before any update."""
        self.fold_pending()
        if not self.with_std:
            total, value_sum = torch.stack([self.num_samples, self.weighted_sum]).tolist()
            return (value_sum / total if total > 0 else math.nan), math.nan
        total, value_sum, square_sum = torch.stack(
            [self.num_samples, self.weighted_sum, self.weighted_square_sum]
        ).tolist()
        if total <= 0:
            return math.nan, math.nan
        mean = value_sum / total
        if total <= 1:
            return mean, 0.0
        # Rounding can push a zero variance slightly negative.
        variance = max(square_sum - value_sum * mean, 0.0) / (total - 1)
        return mean, math.sqrt(variance)

    @override
    def compute_key_value(self) -> dict[str, float]:
        """`{metric_key: mean, "<metric_key>/std": std}`.

        Raises:
            ValueError: if the metric was built without a `metric_key`.
        """
        if self.metric_key is None:
            raise ValueError("AdditiveMetric.compute_key_value() needs the metric_key argument")
        mean, std = self.compute()
        return {self.metric_key: mean, f"{self.metric_key}/std": std}


#: Catalyst's name for the same metric (``metrics.AdditiveValueMetric`` in its docs).
AdditiveValueMetric = AdditiveMetric
