"""The 8x8 handwritten digits bundled with scikit-learn: an offline MNIST stand-in.

1,797 images, split into train and valid once per ``(valid_fraction, seed)``: within each class
the indices are permuted with ``numpy.random.RandomState(seed)`` and the first
``round(valid_fraction * class_count)`` go to valid. The split is the same in every process and
every run, so ranks of a distributed job agree without communicating.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ddprun.contrib.datasets._images import InMemoryImages

__all__ = ["Digits"]

_PIXEL_MAX = 16  # load_digits' pixel values run 0..16


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as (uint8 images Nx8x8 in 0..255, int64 labels N)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "Digits needs scikit-learn: pip install scikit-learn (or pip install 'ddprun[dev]')"
        ) from error
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / _PIXEL_MAX)).clip(0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, valid_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices per class, deterministically.

    Args:
        labels: one class label per item.
        valid_fraction: share of each class that goes to valid, in [0, 1).
        seed: seed of the per-class permutations.

    Returns:
        Sorted train indices and sorted valid indices.
    """
    rng = np.random.RandomState(seed)
    valid_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        valid_parts.append(members[: int(round(valid_fraction * len(members)))])
    valid = np.sort(np.concatenate(valid_parts)) if valid_parts else np.empty(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), valid)
    return train, valid


class Digits(InMemoryImages):
    """scikit-learn's 8x8 digits with a deterministic stratified train/valid split.

    Items are ``(image, label)``: ``image`` is a uint8 8x8 numpy array scaled to 0..255 (so
    ``ToTensor()`` gives a 1x8x8 float tensor in [0, 1]) passed through ``transform``; ``label`` is
    an int passed through ``target_transform``.

    Args:
        train: the train part, else the valid part.
        transform: applied to each image.
        target_transform: applied to each label.
        valid_fraction: share of each class held out for valid, in [0, 1).
        seed: seed of the split (not of anything else).
    """

    def __init__(
        self,
        train: bool = True,
        transform: Callable[[np.ndarray], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        valid_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        images, labels = _load_digits()
        train_idx, valid_idx = stratified_split(labels, valid_fraction, seed)
        chosen = train_idx if train else valid_idx
        self.train = train
        self.images = images[chosen]
        self.targets = labels[chosen]
        self.transform = transform
        self.target_transform = target_transform
