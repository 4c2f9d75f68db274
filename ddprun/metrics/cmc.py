"""Cumulative Matching Characteristics (CMC@k) for metric learning, exact across ranks.

One loader holds both the queries and the gallery (an ``is_query`` flag per sample). The metric
keeps every embedding, label and flag as 1-D "cat" states (gathered once at the loader end; ranks
split evaluation loaders without padding, so each sample is there exactly once), then ranks the
gallery for each query by Euclidean distance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from typing_extensions import override

from ddprun.metrics._support import GrowingMetric, affix, check_topk

__all__ = ["CMCMetric", "cmc_hits"]

_QUERY_CHUNK = 1024  # queries ranked at once: bounds the distance matrix to chunk x gallery


def cmc_hits(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    topk: Sequence[int],
) -> Tensor:
    """For each k, how many queries have a same-label gallery item among their k nearest.

    A query's rank is the number of other-label gallery items at a distance <= its nearest
    same-label item: ties count against the query, so identical (collapsed) embeddings do not
    score as perfect matches, and the result does not depend on the order of the samples. A
    query without any same-label gallery item is a miss for every k. Distances are exact
    pairwise float64 Euclidean distances.

    Returns:
        A (len(topk),) int64 tensor of hit counts.
    """
    hits = torch.zeros(len(topk), dtype=torch.int64)
    ks = torch.tensor(list(topk)).unsqueeze(1)
    gallery = gallery.double()
    for start in range(0, query.shape[0], _QUERY_CHUNK):
        chunk = query[start : start + _QUERY_CHUNK].double()
        labels = query_labels[start : start + _QUERY_CHUNK]
        distances = torch.cdist(chunk, gallery, compute_mode="donot_use_mm_for_euclid_dist")
        same = labels.unsqueeze(1) == gallery_labels.unsqueeze(0)
        nearest_same = distances.masked_fill(~same, float("inf")).amin(dim=1, keepdim=True)
        rank = ((distances <= nearest_same) & ~same).sum(dim=1)
        found = same.any(dim=1)
        hits += ((rank.unsqueeze(0) < ks) & found.unsqueeze(0)).sum(dim=1)
    return hits


class CMCMetric(GrowingMetric):
    """Owns a loader's embeddings, labels and query flags; keys ``cmc01``, ``cmc05`` ...

    CMC@k is the share of queries with a same-label gallery item among their k nearest
    gallery items (see `cmc_hits` for ties and queries without a match). Catalyst 21.12
    refused to run this metric under DDP; here every rank's samples are gathered.

    Args:
        embeddings_key, labels_key, is_query_key: the batch keys `update(**batch)` reads.
        topk_args: the k values (default (1,)).
        compute_on_call: whether calling the metric returns `compute()`.
        prefix, suffix: put around the keys (``{prefix}cmc01{suffix}``).
    """

    def __init__(
        self,
        embeddings_key: str = "embeddings",
        labels_key: str = "labels",
        is_query_key: str = "is_query",
        topk_args: Sequence[int] | None = None,
        compute_on_call: bool = True,
        prefix: str | None = None,
        suffix: str | None = None,
    ) -> None:
        super().__init__(compute_on_call=compute_on_call)
        self.embeddings_key, self.labels_key = embeddings_key, labels_key
        self.is_query_key = is_query_key
        self.topk_args = check_topk(topk_args or (1,))
        self.keys = [affix(f"cmc{k:02d}", prefix, suffix) for k in self.topk_args]
        self.add_state("embeddings", torch.zeros(0, dtype=torch.float32), "cat")
        self.add_state("labels", torch.zeros(0, dtype=torch.int64), "cat")
        self.add_state("is_query", torch.zeros(0, dtype=torch.bool), "cat")
        self._width: int | None = None

    @override
    def reset(self) -> None:
        """Forgets every sample."""
        super().reset()
        self._width = None

    @override
    def update(self, *args: Tensor, **kwargs: Tensor) -> None:
        """Appends one batch, without a host sync: ``update(embeddings, labels, is_query)`` or
        ``update(**{embeddings_key: ..., labels_key: ..., is_query_key: ...})``.

        Embeddings are (B, D) (kept as float32), labels (B,) integers, is_query (B,) bool/0-1.

        Raises:
            ValueError: for a missing key, wrong shapes, or a D that changes within a loader.
        """
        embeddings, labels, is_query = self._unpack(args, kwargs)
        embeddings = embeddings.detach()
        if embeddings.dim() != 2:
            raise ValueError(f"CMCMetric: embeddings must be (B, D), got {tuple(embeddings.shape)}")
        batch, width = embeddings.shape
        if labels.numel() != batch or is_query.numel() != batch:
            raise ValueError(
                f"CMCMetric: {batch} embeddings but {labels.numel()} labels and "
                f"{is_query.numel()} is_query flags; expected one of each per embedding"
            )
        if self._width is not None and width != self._width:
            raise ValueError(f"CMCMetric: embeddings of size {width}, earlier {self._width}")
        self._width = width
        self.append("embeddings", embeddings)
        self.append("labels", labels.detach())
        self.append("is_query", is_query.detach() != 0)

    def _unpack(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
        if args:
            if len(args) != 3 or kwargs:
                raise ValueError("CMCMetric.update takes (embeddings, labels, is_query)")
            return args
        keys = (self.embeddings_key, self.labels_key, self.is_query_key)
        missing = [key for key in keys if key not in kwargs]
        if missing:
            raise ValueError(f"CMCMetric.update: missing {missing} (got {sorted(kwargs)})")
        return tuple(kwargs[key] for key in keys)

    @override
    def compute(self) -> list[float]:
        """CMC@k for each k over the queries seen (NaN without queries)."""
        rows = self.labels.numel()
        if rows == 0:
            return [float("nan")] * len(self.topk_args)
        embeddings = self.embeddings.view(rows, -1).cpu()
        labels, query = self.labels.cpu(), self.is_query.cpu()
        queries = int(query.sum())
        if queries == 0:
            return [float("nan")] * len(self.topk_args)
        hits = cmc_hits(
            embeddings[query], labels[query], embeddings[~query], labels[~query], self.topk_args
        )
        return (hits.double() / queries).tolist()

    @override
    def compute_key_value(self) -> dict[str, float]:
        """``{"cmc01": ..., ...}`` for the configured k values."""
        return dict(zip(self.keys, self.compute()))
