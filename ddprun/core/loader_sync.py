"""A loader's metric states and their one packed reduction at the loader's end.

`LoaderSync` holds what the runner reduces at a loader end: the metrics callbacks track
(`IRunner.track_metric`), the per-key averages of ``batch_metrics`` (weighted by batch size, in
tensors on the device: no host sync per batch) and the agreed batch-metric keys; its `reduce`
packs them, the stop vote and the key vote into one reduction, and runs the loader-end callbacks
inside it.

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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ddprun.core.batch_metrics import Deferred
from ddprun.core.stop import StopVote
from ddprun.metrics import AdditiveMetric, Metric, synchronized


class LoaderSync:
    """The running loader's metric states (one per runner; reset at every loader start).

    Attributes:
        tracked: metrics synced at loader end (`IRunner.track_metric`).
        exact_keys: ``batch_metrics`` keys a tracked metric computes exactly (not averaged).
        averages: per-key averages of the other ``batch_metrics`` values, by key.
        agreed_keys: the batch-metric keys every rank packs (None: not agreed yet this run).
    """

    def __init__(self) -> None:
        self.start_run()

    def start_run(self) -> None:
        """A new run: the keys are agreed again at the first loader end."""
        self.agreed_keys: set[str] | None = None
        self.start_loader()

    def start_loader(self, device: torch.device | None = None) -> None:
        """Empty states for a new loader, whose averages live on `device` (the engine's)."""
        self.device = torch.device("cpu") if device is None else device
        self.tracked: list[Metric] = []
        self.exact_keys: set[str] = set()
        self.averages: dict[str, AdditiveMetric] = {}

    def track(self, metric: Metric, batch_keys: Iterable[str] = ()) -> Metric:
        """Sync `metric` at this loader's end; `batch_keys` are not averaged per batch."""
        self.tracked.append(metric)
        self.exact_keys.update(batch_keys)
        return metric

    def track_new(self, metrics: Iterable[Metric], device: torch.device) -> None:
        """Track those of `metrics` not tracked yet, moved to `device` (where the packed
        reduction runs: the GPU under NCCL)."""
        for metric in metrics:
            if all(metric is not known for known in self.tracked):
                self.tracked.append(metric.to(device))

    def add_batch(
        self, values: Mapping[str, Any], batch_size: int, device: torch.device | None = None
    ) -> None:
        """Fold one batch's ``batch_metrics`` into the per-key averages (on `device`, by
        default the loader's)."""
        averages, exact = self.averages, self.exact_keys
        # the values as stored: deferred ones (exact keys, skipped) are not computed
        for key, value in dict.items(values) if isinstance(values, dict) else values.items():
            if key in exact:
                continue
            if type(value) is Deferred:
                value = values[key]
            average = averages.get(key)
            if average is None:
                average = AdditiveMetric(metric_key=key, with_std=False)
                average.to(self.device if device is None else device)
                averages[key] = average
            average.update(value, batch_size)

    def reduce(
        self,
        engine: Any,
        device: torch.device,
        signum: int | None,
        on_synced: Callable[[dict[str, float], int | None], None],
    ) -> None:
        """One packed reduction of every state and the stop vote; then ``on_synced(means,
        agreed stop signal)`` runs inside it (the loader-end callbacks: they may read and
        write synced metrics). A new key on some rank costs one key exchange and a repeat."""
        collectives = engine.collectives
        if collectives is not None and self.agreed_keys is None:
            self.agreed_keys = gather_keys(self.averages, set(), engine)
        while not self._reduce_once(collectives, device, signum, on_synced):
            # a rank logged a key the others do not pack yet: agree on the keys, reduce again
            self.agreed_keys = gather_keys(self.averages, self.agreed_keys or set(), engine)

    def _reduce_once(
        self,
        collectives: Any,
        device: torch.device,
        signum: int | None,
        on_synced: Callable[[dict[str, float], int | None], None],
    ) -> bool:
        agreed = self.agreed_keys if collectives is not None else None
        averages = averages_to_pack(self.averages, agreed, device)
        if collectives is None:  # one process: nothing to vote on, nothing to reduce
            on_synced(_means(averages), signum)
            return True
        outside = agreed is not None and not agreed.issuperset(self.averages)
        vote, keys = StopVote(signum, device), KeyVote(outside, device)
        with synchronized([*self.tracked, *averages.values(), vote, keys], collectives):
            if not keys.compute():
                return False  # no callback ran
            on_synced(_means(averages), vote.compute())
        return True


def _means(averages: Mapping[str, AdditiveMetric]) -> dict[str, float]:
    """The mean of each average that some rank reported."""
    means = {}
    for key, average in averages.items():
        mean = mean_if_reported(average)
        if mean is not None:
            means[key] = mean
    return means


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
