"""Datasets derived from MNIST (Catalyst 21.12's ``MnistMLDataset``, ``MnistQGDataset``,
``PartialMNIST``).

The metric-learning pair splits the digits so that evaluation measures generalisation to
unseen classes: ``MnistMLDataset`` is the training split's digits 0-4, ``MnistQGDataset`` the
test split's digits 5-9, its first ``len - int(gallery_fraq * len)`` items (file order) the
queries and the rest the gallery. Labels keep their digit values (5-9 are not renumbered).
Every keyword of ``MNIST`` (``root``, ``download``, ``normalize``, ``numpy``, ``transform``,
``target_transform``) passes through.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

from ddprun.contrib.data.dataset_ml import MetricLearningTrainDataset, QueryGalleryDataset
from ddprun.contrib.datasets.mnist import MNIST

__all__ = ["MnistMLDataset", "MnistQGDataset", "PartialMNIST"]

_SPLIT = 5  # digits below go to metric-learning training, the others to its evaluation


class MnistMLDataset(MetricLearningTrainDataset, MNIST):
    """MNIST's training split, digits 0-4 only, for metric-learning training.

    Args:
        root: as in ``MNIST``.
        train: must be True (evaluate with `MnistQGDataset`).
        **kwargs: the other arguments of ``MNIST``.
    """

    classes: tuple[str, ...] = MNIST.classes[:_SPLIT]

    def __init__(self, root: Any, train: bool = True, **kwargs: Any) -> None:
        if train is not True:
            raise ValueError(
                "MnistMLDataset is the training split (digits 0-4); evaluate with "
                "MnistQGDataset (the test split's digits 5-9)"
            )
        super().__init__(root, train=True, **kwargs)
        keep = self.targets < _SPLIT
        self.images, self.targets = self.images[keep], self.targets[keep]

    def get_labels(self) -> list[int]:
        """Returns every item's digit, in item order."""
        return self.targets.tolist()


class MnistQGDataset(QueryGalleryDataset):
    """MNIST's test split, digits 5-9 only, as queries then gallery.

    Items are ``{"features": image, "targets": label, "is_query": 0-d bool tensor}``, the image
    as ``MNIST`` gives it.

    Args:
        gallery_fraq: share of the items that form the gallery, in [0, 1] (the last
            ``int(gallery_fraq * len)`` items).
        **kwargs: arguments of ``MNIST``: ``root`` (by keyword) and the others, except
            ``train`` (always the test split).
    """

    classes: tuple[str, ...] = MNIST.classes[_SPLIT:]

    def __init__(self, gallery_fraq: float = 0.2, **kwargs: Any) -> None:
        if isinstance(gallery_fraq, bool) or not isinstance(gallery_fraq, Real):
            raise TypeError(
                f"gallery_fraq must be a number in [0, 1], got {gallery_fraq!r} (pass the "
                "dataset folder as root=...)"
            )
        if not 0 <= gallery_fraq <= 1:
            raise ValueError(f"gallery_fraq must be in [0, 1], got {gallery_fraq}")
        if "train" in kwargs:
            raise ValueError("MnistQGDataset is always MNIST's test split; drop train=")
        if "root" not in kwargs:
            raise TypeError("MnistQGDataset needs root=<folder holding MNIST/raw>")
        self._mnist = MNIST(train=False, **kwargs)
        keep = self._mnist.targets >= _SPLIT
        self._mnist.images = self._mnist.images[keep]
        self._mnist.targets = self._mnist.targets[keep]
        size = len(self._mnist)
        self._gallery_size = int(gallery_fraq * size)
        self._query_size = size - self._gallery_size
        self._is_query = torch.zeros(size, dtype=torch.bool)
        self._is_query[: self._query_size] = True

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns the item's image, digit and whether it is a query."""
        image, label = self._mnist[index]
        return {"features": image, "targets": label, "is_query": self._is_query[index]}

    def __len__(self) -> int:
        return len(self._mnist)

    def __repr__(self) -> str:
        return repr(self._mnist)

    @property
    def query_size(self) -> int:
        """Returns the number of queries (the first items)."""
        return self._query_size

    @property
    def gallery_size(self) -> int:
        """Returns the number of gallery items (the last items)."""
        return self._gallery_size

    @property
    def data(self) -> np.ndarray:
        """Returns the uint8 images, N x 28 x 28."""
        return self._mnist.images

    @property
    def targets(self) -> np.ndarray:
        """Returns the digits, int64."""
        return self._mnist.targets


class PartialMNIST(MNIST):
    """The first ``num_samples`` items (file order) of each digit in ``classes``.

    As in Catalyst, ``classes`` then holds the chosen digits (ints, ascending) instead of the
    class names. A digit with fewer items keeps all of them.

    Args:
        num_samples: items per digit (>= 1).
        classes: the digits to keep; None or empty keeps all ten.
        **kwargs: the arguments of ``MNIST``.
    """

    def __init__(
        self, num_samples: int = 100, classes: Sequence[int] | None = (0, 1, 2), **kwargs: Any
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(
                f"num_samples must be an int >= 1, got {num_samples!r} (pass the folder as root=...)"
            )
        chosen = sorted(int(c) for c in classes) if classes else list(range(10))
        self.num_samples = num_samples
        super().__init__(**kwargs)
        self.classes = chosen  # type: ignore[assignment]
        parts = [np.flatnonzero(self.targets == c)[:num_samples] for c in chosen]
        keep = np.sort(np.concatenate(parts))
        self.images, self.targets = self.images[keep], self.targets[keep]
