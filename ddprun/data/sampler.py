"""Class-balancing samplers under Catalyst 21.12's names (``catalyst.data.sampler``).

- `BalanceClassSampler` (a ``sampler``): every class the same number of times per epoch, then
  shuffled.
- `BatchBalanceClassSampler` (a ``batch_sampler``): every batch holds ``num_classes`` distinct
  classes x ``num_samples`` items of each (the P x K batches of metric learning).

Randomness: each epoch's draw comes from the sampler's ``generator`` (a ``torch.Generator``)
when set, else from one seed taken from torch's global RNG (as torch's ``RandomSampler``), so
``Runner.train(seed=...)`` makes runs repeatable. Under DDP the engine deals a
``BatchBalanceClassSampler`` whole (``DistributedBatchSamplerWrapper``: one draw per epoch,
seeded identically on every rank; rank r runs batches r, r + n, ...) and deals a
`BalanceClassSampler`'s indices (``DistributedSamplerWrapper``), so the ranks never overlap.

The distributed samplers themselves live in ``ddprun.data.samplers``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["BalanceClassSampler", "BatchBalanceClassSampler"]


def _labels_array(labels: Any, name: str) -> np.ndarray:
    """Returns ``labels`` (list, numpy array or tensor) as a 1-D array; refuses floats."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name}: labels must be a non-empty 1-D sequence, got {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name}: labels must be class ids (ints or strings), got {array.dtype}")
    return array


def _members(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Returns (the distinct labels, sorted; the item indices of each)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
    return classes, np.split(order, bounds)


def _epoch_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy RNG for one epoch, seeded from ``generator`` (or torch's global RNG)."""
    seed = torch.randint(0, 2**62, (), generator=generator)
    return np.random.default_rng(int(seed))


class BalanceClassSampler(Sampler[int]):
    """Draws every class the same number of times per epoch, in a shuffled order.

    A class with fewer items than its share is drawn with replacement, others without.

    Args:
        labels: the class of every item of the dataset.
        mode: ``"downsampling"`` (each class as often as the smallest), ``"upsampling"`` (as
            often as the largest) or an int (that many items per class).
        generator: the source of randomness (see the module docstring).
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray | torch.Tensor,
        mode: str | int = "downsampling",
        generator: torch.Generator | None = None,
    ) -> None:
        array = _labels_array(labels, "BalanceClassSampler")
        self.classes, self.lbl2idx = _members(array)
        sizes = [len(members) for members in self.lbl2idx]
        if isinstance(mode, bool) or not isinstance(mode, (str, int, np.integer)):
            raise TypeError(f"mode must be 'downsampling', 'upsampling' or an int, got {mode!r}")
        if isinstance(mode, str):
            if mode not in ("downsampling", "upsampling"):
                raise ValueError(
                    f"mode must be 'downsampling', 'upsampling' or an int, got {mode!r}"
                )
            per_class = min(sizes) if mode == "downsampling" else max(sizes)
        elif mode < 1:
            raise ValueError(f"mode (items per class) must be >= 1, got {mode}")
        else:
            per_class = int(mode)
        self.samples_per_class = per_class
        self.length = per_class * len(self.classes)
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        rng = _epoch_rng(self.generator)
        n = self.samples_per_class
        picks = [rng.choice(m, n, replace=n > len(m)) for m in self.lbl2idx]
        indices = np.concatenate(picks)
        rng.shuffle(indices)
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.length


class BatchBalanceClassSampler(Sampler[list[int]]):
    """Batches of ``num_classes`` distinct classes x ``num_samples`` items each (P x K).

    Each batch picks its classes uniformly without replacement, then ``num_samples`` items of
    each class (without replacement; with replacement only for a class smaller than
    ``num_samples``), independently of the other batches. A batch lists the first class's
    items, then the second's, and so on. Give it to a DataLoader as ``batch_sampler``.

    Args:
        labels: the class of every item of the dataset; every class needs >= 2 items.
        num_classes: classes per batch (P), 2 <= P <= the number of classes.
        num_samples: items per class in a batch (K), >= 2.
        num_batches: batches per epoch; default ``len(labels) // (P * K)``.
        generator: the source of randomness (see the module docstring).
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray | torch.Tensor,
        num_classes: int,
        num_samples: int,
        num_batches: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        array = _labels_array(labels, "BatchBalanceClassSampler")
        classes, self.lbl2idx = _members(array)
        for name, value in (("num_classes", num_classes), ("num_samples", num_samples)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
                raise ValueError(
                    f"{name} must be an int >= 2 (a triplet needs 2 classes and 2 items of a "
                    f"class per batch), got {value!r}"
                )
        if num_classes > len(classes):
            raise ValueError(
                f"num_classes={num_classes} but the labels hold only {len(classes)} classes"
            )
        small = {c.item(): len(m) for c, m in zip(classes, self.lbl2idx) if len(m) < 2}
        if small:
            raise ValueError(f"every class needs at least 2 items; these have 1: {small}")
        batch_size = int(num_classes) * int(num_samples)
        if num_batches is None:
            num_batches = len(array) // batch_size
            if num_batches == 0:
                raise ValueError(
                    f"{len(array)} items make no full batch of {num_classes} x {num_samples}; "
                    "pass num_batches"
                )
        elif num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self._num_classes, self._num_samples = int(num_classes), int(num_samples)
        self._batch_size, self._num_batches = batch_size, int(num_batches)
        self.generator = generator

    @property
    def batch_size(self) -> int:
        """Returns the items per batch, ``num_classes * num_samples``."""
        return self._batch_size

    @property
    def batches_in_epoch(self) -> int:
        """Returns the batches per epoch."""
        return self._num_batches

    def __len__(self) -> int:
        """Returns the batches per epoch (a batch sampler's length)."""
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng, k = _epoch_rng(self.generator), self._num_samples
        members = self.lbl2idx
        for _ in range(self._num_batches):
            chosen = rng.choice(len(members), self._num_classes, replace=False)
            picks = [rng.choice(members[c], k, replace=k > len(members[c])) for c in chosen]
            yield np.concatenate(picks).tolist()
