"""Triplets formed inside a batch, for triplet losses (Catalyst 21.12's in-batch samplers).

A sampler's ``sample(features, labels)`` returns ``(anchor, positive, negative)``: three
tensors with one row per triplet, taken from ``features`` (so gradients flow to them).

- `AllTripletsSampler`: every ``(a, p, n)`` with ``label[a] == label[p]``, ``a < p`` and
  ``label[n] != label[a]``; at most ``max_output_triplets`` of them (a uniformly random subset,
  drawn from torch's global RNG, when there are more).
- `HardTripletsSampler`: one triplet per sample: the sample is the anchor, its positive is the
  same-label sample farthest from it, its negative the other-label sample closest to it
  (Euclidean distances; on L2-normalised features with ``norm_required=True``). Ties go to the
  lowest index.
- `HardClusterSampler`: one triplet per label of a batch of ``p`` labels x ``k`` samples: the
  anchor is the label's mean feature, the positive the label's sample farthest from that mean,
  the negative the closest other label's mean.

Every batch needs at least two labels and at least two samples of each label (what
``ddprun.data.BatchBalanceClassSampler`` yields with ``num_classes > 1, num_samples > 1``); a
batch without raises ``ValueError`` naming what it holds.

Decisions: `HardTripletsSampler` works on whole tensors on the features' device (no per-anchor
Python loop as in Catalyst); checking the batch reads one bool on the host. `AllTripletsSampler`
and `HardClusterSampler` need the labels on the host, as in Catalyst (the number of triplets, or
the grouping, depends on them). Subclasses of `InBatchTripletsSampler` implement
``_sample(features, labels)`` with ``labels`` a Python list, as Catalyst's do.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "AllTripletsSampler",
    "HardClusterSampler",
    "HardTripletsSampler",
    "IInbatchTripletSampler",
    "InBatchTripletsSampler",
    "convert_labels2list",
]

Triplets = tuple[Tensor, Tensor, Tensor]
TripletIds = tuple[Sequence[int] | Tensor, Sequence[int] | Tensor, Sequence[int] | Tensor]
_NEEDS = "needs at least 2 labels and at least 2 samples of every label in a batch"


def convert_labels2list(labels: Tensor | Sequence[int]) -> list[int]:
    """Returns a batch's labels as a list of ints.

    Args:
        labels: a 1-D integer tensor (a trailing size-1 axis is dropped) or a sequence of ints.
    """
    if isinstance(labels, Tensor):
        flat = labels.squeeze(-1) if labels.dim() == 2 and labels.shape[-1] == 1 else labels
        if flat.dim() != 1 or flat.is_floating_point() or flat.is_complex():
            raise TypeError(
                "labels must be a 1-D integer tensor (one class index per sample), got "
                f"dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        return flat.tolist()
    if isinstance(labels, (list, tuple)):
        return [int(label) for label in labels]
    raise TypeError(f"labels must be a tensor or a list of ints, got {type(labels).__name__}")


def _check_counts(name: str, labels: list[int]) -> Counter[int]:
    counts = Counter(labels)
    if len(counts) < 2 or min(counts.values()) < 2:
        raise ValueError(f"{name} {_NEEDS}; got label counts {dict(sorted(counts.items()))}")
    return counts


class IInbatchTripletSampler(ABC):
    """Forms triplets inside a batch."""

    @abstractmethod
    def _check_input_labels(self, labels: list[int]) -> None:
        """Raises ``ValueError`` when the batch's labels cannot give this sampler's triplets."""

    @abstractmethod
    def sample(self, features: Tensor, labels: Tensor | Sequence[int]) -> Triplets:
        """Returns ``(anchor, positive, negative)`` rows of ``features``.

        Args:
            features: ``[batch_size, dim]`` embeddings.
            labels: ``batch_size`` class labels (tensor or list).
        """


class InBatchTripletsSampler(IInbatchTripletSampler):
    """A sampler that picks triplets by index: subclasses implement ``_sample``."""

    def _check_input_labels(self, labels: list[int]) -> None:
        _check_counts(type(self).__name__, labels)

    @abstractmethod
    def _sample(self, features: Tensor, labels: list[int]) -> TripletIds:
        """Returns the indices ``(anchors, positives, negatives)`` of the batch's triplets."""

    def sample(self, features: Tensor, labels: Tensor | Sequence[int]) -> Triplets:
        """Returns ``(anchor, positive, negative)`` rows of ``features`` (see the module doc)."""
        labels_list = convert_labels2list(labels)
        _check_features(features, len(labels_list))
        self._check_input_labels(labels_list)
        ids_anchor, ids_pos, ids_neg = self._sample(features, labels_list)
        return features[ids_anchor], features[ids_pos], features[ids_neg]


def _check_features(features: Tensor, batch_size: int) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a [batch_size, dim] tensor, got {shape}")
    if features.shape[0] != batch_size:
        raise ValueError(
            f"features hold {features.shape[0]} samples but labels {batch_size}; "
            "expected one label per row of features"
        )


class AllTripletsSampler(InBatchTripletsSampler):
    """Every triplet of the batch, or a random ``max_output_triplets`` of them.

    Args:
        max_output_triplets: the most triplets returned per batch (at least 1).
    """

    def __init__(self, max_output_triplets: int = sys.maxsize) -> None:
        if max_output_triplets < 1:
            raise ValueError(f"max_output_triplets must be >= 1, got {max_output_triplets}")
        self._max_out_triplets = max_output_triplets

    def _sample(self, features: Tensor, labels: list[int]) -> TripletIds:
        target = torch.as_tensor(labels)
        same = target[:, None] == target[None, :]
        pairs = torch.triu(same, diagonal=1)  # (a, p) with a < p and the same label
        # (a, p, n): a valid pair and a negative for the anchor, in (a, p, n) order
        triplets = (pairs[:, :, None] & ~same[:, None, :]).nonzero()
        if len(triplets) > self._max_out_triplets:
            keep = torch.randperm(len(triplets))[: self._max_out_triplets]
            triplets = triplets[keep]
        triplets = triplets.to(features.device)
        return triplets[:, 0], triplets[:, 1], triplets[:, 2]


class HardTripletsSampler(InBatchTripletsSampler):
    """The hardest positive and the hardest negative of every sample (see the module doc).

    Args:
        norm_required: measure distances between L2-normalised features.
    """

    def __init__(self, norm_required: bool = False) -> None:
        self._norm_required = norm_required

    def sample(self, features: Tensor, labels: Tensor | Sequence[int]) -> Triplets:
        """Returns one ``(anchor, hardest positive, hardest negative)`` triplet per sample."""
        target = torch.as_tensor(labels, device=features.device)
        target = target.squeeze(-1) if target.dim() == 2 and target.shape[-1] == 1 else target
        if target.dim() != 1 or target.is_floating_point():
            raise TypeError(
                f"labels must be 1-D integers, got dtype {target.dtype} shape {tuple(target.shape)}"
            )
        _check_features(features, len(target))
        ids_pos, ids_neg, valid = self._hardest(features, target)
        if not bool(valid):  # the one host read: a bad batch must not give silent garbage
            self._check_input_labels(convert_labels2list(target))
        return features, features[ids_pos], features[ids_neg]

    def _sample(self, features: Tensor, labels: list[int]) -> TripletIds:
        target = torch.as_tensor(labels, device=features.device)
        ids_pos, ids_neg, _ = self._hardest(features, target)
        return torch.arange(len(labels), device=features.device), ids_pos, ids_neg

    def _hardest(self, features: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (hardest positive ids, hardest negative ids, whether every sample has both)."""
        with torch.no_grad():  # only the choice of indices; gradients flow through features
            points = F.normalize(features, p=2, dim=1) if self._norm_required else features
            distances = torch.cdist(points, points, p=2)
            same = target[:, None] == target[None, :]
            positive = same.clone()
            positive.fill_diagonal_(False)
            far = distances.masked_fill(~positive, float("-inf")).argmax(dim=1)
            near = distances.masked_fill(same, float("inf")).argmin(dim=1)
            valid = (positive.any(dim=1) & ~same.all(dim=1)).all()
        return far, near, valid


class HardClusterSampler(IInbatchTripletSampler):
    """One triplet per label: (label mean, farthest sample of the label, closest other mean).

    The batch must hold the same number ``k > 1`` of samples for each of ``p > 1`` labels.
    """

    def _check_input_labels(self, labels: list[int]) -> None:
        counts = _check_counts(type(self).__name__, labels)
        if len(set(counts.values())) != 1:
            raise ValueError(
                "HardClusterSampler needs the same number of samples for every label; got "
                f"label counts {dict(sorted(counts.items()))}"
            )

    def sample(self, features: Tensor, labels: Tensor | Sequence[int]) -> Triplets:
        """Returns ``p`` triplets ``(mean of label i, its farthest sample, closest other mean)``,
        labels in ascending order."""
        labels_list = convert_labels2list(labels)
        _check_features(features, len(labels_list))
        self._check_input_labels(labels_list)
        p = len(set(labels_list))
        # stable sort: rows grouped by ascending label, batch order kept within a label
        order = torch.as_tensor(labels_list).argsort(stable=True).to(features.device)
        groups = features[order].view(p, len(labels_list) // p, features.shape[1])
        means = groups.mean(dim=1)
        with torch.no_grad():  # only the choice of indices; gradients flow through features
            spread = (groups - means[:, None, :]).pow(2).sum(dim=2)  # [p, k]
            between = torch.cdist(means, means, p=2)
            between.fill_diagonal_(float("inf"))
        positives = groups[torch.arange(p, device=features.device), spread.argmax(dim=1)]
        return means, positives, means[between.argmin(dim=1)]
