from __future__ import annotations

import numpy as np
import pytest
import torch

from ddprun.contrib.datasets import Digits
from ddprun.contrib.datasets.digits import stratified_split
from ddprun.data.transforms import ToTensor

pytest.importorskip("sklearn")


def test_split_sizes_and_disjoint():
    train, valid = Digits(train=True), Digits(train=False)
    assert len(train) + len(valid) == 1797
    assert len(valid) == pytest.approx(0.2 * 1797, abs=10)
    # stratified: every class is in both parts in about the same share
    counts_valid = np.bincount(valid.targets, minlength=10)
    counts_all = counts_valid + np.bincount(train.targets, minlength=10)
    assert np.all(np.abs(counts_valid - 0.2 * counts_all) <= 1)


def test_split_is_deterministic_and_seed_dependent():
    labels = np.repeat(np.arange(10), 30)
    a, b = stratified_split(labels, 0.2, seed=0), stratified_split(labels, 0.2, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = stratified_split(labels, 0.2, seed=1)
    assert not np.array_equal(a[1], c[1])
    assert np.intersect1d(a[0], a[1]).size == 0 and a[0].size + a[1].size == labels.size
    first, again = Digits(train=False), Digits(train=False)
    assert np.array_equal(first.images, again.images)


def test_items_are_uint8_images_and_int_labels():
    data = Digits(train=False, transform=ToTensor())
    image, label = data[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    assert isinstance(label, int)
    raw, _ = Digits()[0]
    assert raw.dtype == np.uint8 and raw.shape == (8, 8) and raw.max() > 200


def test_valid_fraction_validation():
    with pytest.raises(ValueError, match="valid_fraction"):
        Digits(valid_fraction=1.0)
    assert len(Digits(valid_fraction=0.0)) == 1797
