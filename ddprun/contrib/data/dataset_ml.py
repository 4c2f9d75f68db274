"""What a metric-learning dataset provides (Catalyst 21.12's ``catalyst.contrib.data.dataset_ml``).

``MetricLearningTrainDataset``: a training dataset that can list every item's label
(``get_labels``), which a class-balancing batch sampler needs before any item is read.
``QueryGalleryDataset``: an evaluation dataset whose items are dicts with ``features``,
``targets`` and a boolean ``is_query``, and which knows its ``query_size`` and
``gallery_size`` (what a CMC score needs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch.utils.data import Dataset

__all__ = ["MetricLearningTrainDataset", "QueryGalleryDataset"]


class MetricLearningTrainDataset(Dataset, ABC):
    """A training dataset for metric learning: it lists the label of every item."""

    @abstractmethod
    def get_labels(self) -> list[int]:
        """Returns the label of every item, in item order."""


class QueryGalleryDataset(Dataset, ABC):
    """An evaluation dataset split into queries and a gallery.

    Items are dicts ``{"features": ..., "targets": ..., "is_query": bool}``.
    """

    @abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns the item's features, target and whether it is a query."""

    @property
    @abstractmethod
    def query_size(self) -> int:
        """Returns the number of query items."""

    @property
    @abstractmethod
    def gallery_size(self) -> int:
        """Returns the number of gallery items."""
