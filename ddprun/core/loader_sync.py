"""What ranks pack at a loader end: the agreed keys of the per-batch averages.

Every value a user puts in ``batch_metrics`` is averaged per key over the loader, and at loader
end those averages join the one packed metric reduction. A reduction needs the same layout on
every rank, but the keys need not be the same: a rank with no batch of an evaluation loader has
no key at all, and a rare-event counter or a value logged every n batches shows up on some ranks
only. So ranks pack the averages of one *agreed* key set (sorted), a key a rank never saw counts
as zero samples, and a small vote inside the same reduction says whether any rank has a key
outside that set. Only then (the first loader end of a run, or when a new key appears) do ranks
exchange their key sets with one ``all_gather_object`` and reduce again; in the steady state the
agreement costs nothing beyond the one reduction. A key no rank reported in a loader is left out
of ``loader_metrics``, as in a single process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ddprun.metrics import AdditiveMetric, Metric


class KeyVote(Metric):
    """How many ranks hold batch-metric keys outside the agreed set (a "sum" state)."""

    def __init__(self, outside: bool, device: torch.device) -> None:
        super().__init__(compute_on_call=False)
        self.add_state("ranks_outside", torch.zeros(1, dtype=torch.float64), "sum")
        self.to(device)
        if outside:
            self.ranks_outside.fill_(1.0)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to accumulate: the vote is cast when it is built."""

    def compute(self) -> bool:
        """True when every rank packed all of its keys (synced: over all ranks)."""
        return float(self.ranks_outside.sum()) == 0

    def compute_key_value(self) -> dict[str, float]:
        return {}


def gather_keys(local: Iterable[str], agreed: set[str], engine: Any) -> set[str]:
    """The agreed set grown by every rank's keys (one ``all_gather_object``)."""
    return agreed.union(*engine.all_gather_object(sorted(local)))


def averages_to_pack(
    local: Mapping[str, AdditiveMetric], agreed: set[str] | None, device: torch.device
) -> dict[str, AdditiveMetric]:
    """The averages to reduce, by key, in the same order on every rank.

    Args:
        local: this rank's averages.
        agreed: the agreed keys, or None in a single process (the local keys then).
        device: where empty averages for keys this rank never saw are created.
    """
    if agreed is None:
        return dict(local)
    packed = {}
    for key in sorted(agreed):
        average = local.get(key)
        if average is None:  # zero samples here: adds nothing to the weighted mean
            average = AdditiveMetric(metric_key=key, with_std=False).to(device)
        packed[key] = average
    return packed


def mean_if_reported(average: AdditiveMetric) -> float | None:
    """The average's mean over all ranks, or None when no rank reported the key."""
    mean, _ = average.compute()
    return mean if float(average.num_samples) > 0 else None
