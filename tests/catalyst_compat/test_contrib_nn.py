"""Catalyst 21.12's contrib layers, losses, in-batch triplet samplers and MNIST models (issue
12, item 5), checked against hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ddprun import contrib
from ddprun.contrib import data as cdata
from ddprun.contrib import layers, losses, models
from ddprun.contrib import nn as cnn

EPS = 1e-6  # torch's pairwise_distance adds it to the difference


def _d(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(sum((float(x) - float(y) + EPS) ** 2 for x, y in zip(a, b)))


def _plain(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _triplet_loss(triplets, features, margin) -> float:
    terms = [max(_d(features[a], features[p]) - _d(features[a], features[n]) + margin, 0.0)
             for a, p, n in triplets]  # fmt: skip
    return sum(terms) / len(terms)


FEATURES = torch.tensor(
    [[0.0, 0.0], [1.0, 0.2], [3.0, 0.0], [0.4, 2.0], [2.5, 2.5], [0.1, 0.9], [4.0, 1.0]]
)
LABELS = [0, 0, 1, 1, 2, 2, 0]


# --------------------------------------------------------------------------- triplet losses
def test_hard_triplets_loss_equals_hand_computation():
    triplets = []
    for a, label in enumerate(LABELS):
        positives = [p for p, lp in enumerate(LABELS) if lp == label and p != a]
        negatives = [n for n, ln in enumerate(LABELS) if ln != label]
        p = max(positives, key=lambda j: _plain(FEATURES[a], FEATURES[j]))
        n = min(negatives, key=lambda j: _plain(FEATURES[a], FEATURES[j]))
        triplets.append((a, p, n))
    sampler = cdata.HardTripletsSampler(norm_required=False)
    anchor, positive, negative = sampler.sample(FEATURES, torch.tensor(LABELS))
    assert torch.equal(anchor, FEATURES)
    assert torch.equal(positive, FEATURES[[p for _, p, _ in triplets]])
    assert torch.equal(negative, FEATURES[[n for _, _, n in triplets]])
    features = FEATURES.clone().requires_grad_(True)
    loss = cnn.TripletMarginLossWithSampler(margin=0.5, sampler_inbatch=sampler)(features, LABELS)
    assert loss.item() == pytest.approx(_triplet_loss(triplets, FEATURES, 0.5), abs=1e-6)
    loss.backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_hard_triplets_with_normalised_distances():
    unit = torch.nn.functional.normalize(FEATURES + 0.1, dim=1)
    anchor_ids, pos_ids, neg_ids = cdata.HardTripletsSampler(norm_required=True)._sample(
        FEATURES + 0.1, LABELS
    )
    for a, p, n in zip(anchor_ids.tolist(), pos_ids.tolist(), neg_ids.tolist()):
        same = [j for j, lj in enumerate(LABELS) if lj == LABELS[a] and j != a]
        other = [j for j, lj in enumerate(LABELS) if lj != LABELS[a]]
        assert p == max(same, key=lambda j: _plain(unit[a], unit[j]))
        assert n == min(other, key=lambda j: _plain(unit[a], unit[j]))


def test_all_triplets_loss_equals_hand_computation():
    triplets = [
        (a, p, n)
        for a, p in itertools.combinations(range(len(LABELS)), 2)
        if LABELS[a] == LABELS[p]
        for n in range(len(LABELS))
        if LABELS[n] != LABELS[a]
    ]
    assert len(triplets) == 3 * 4 + 1 * 5 + 1 * 5  # C(n_c, 2) * (B - n_c) per label
    criterion = losses.TripletMarginLossWithSampler(0.3, cdata.AllTripletsSampler())
    loss = criterion(FEATURES, torch.tensor(LABELS))
    assert loss.item() == pytest.approx(_triplet_loss(triplets, FEATURES, 0.3), abs=1e-6)
    anchor, _, _ = cdata.AllTripletsSampler(max_output_triplets=5).sample(FEATURES, LABELS)
    assert anchor.shape == (5, 2)


def test_hard_cluster_sampler_equals_hand_computation():
    features = torch.tensor(
        [[0.0, 0.0], [5.0, 5.0], [2.0, 0.0], [5.0, 7.0], [9.0, 0.0], [9.0, 3.0]]
    )
    labels = [0, 1, 0, 1, 2, 2]
    means = torch.tensor([[1.0, 0.0], [5.0, 6.0], [9.0, 1.5]])
    anchor, positive, negative = cdata.HardClusterSampler().sample(features, labels)
    assert torch.allclose(anchor, means)
    # farthest from its mean (ties: the first in batch order) and the closest other mean
    assert torch.equal(positive, features[[0, 1, 4]])
    closest = [
        min((j for j in range(3) if j != i), key=lambda j: _plain(means[i], means[j]))
        for i in range(3)
    ]
    assert closest == [1, 2, 1] and torch.allclose(negative, means[closest])


@pytest.mark.parametrize(
    "sampler",
    [cdata.HardTripletsSampler(), cdata.AllTripletsSampler(), cdata.HardClusterSampler()],
    ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([0, 0, 1, 2], r"2 samples of every label.*\{0: 2, 1: 1, 2: 1\}"),
        ([3, 3, 3, 3], r"\{3: 4\}"),
    ],
)
def test_in_batch_samplers_refuse_batches_without_triplets(sampler, labels, match):
    with pytest.raises(ValueError, match=match):
        sampler.sample(torch.randn(4, 3), torch.tensor(labels))


def test_in_batch_sampler_input_errors():
    with pytest.raises(ValueError, match="same number of samples for every label"):
        cdata.HardClusterSampler().sample(torch.randn(5, 2), [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="features hold 3 samples but labels 4"):
        cdata.AllTripletsSampler().sample(torch.randn(3, 2), [0, 0, 1, 1])
    with pytest.raises(TypeError, match="1-D integer"):
        cdata.AllTripletsSampler().sample(torch.randn(4, 2), torch.rand(4))
    with pytest.raises(TypeError, match="sample\\(features, labels\\)"):
        losses.TripletMarginLossWithSampler(0.5, sampler_inbatch=object())


# ---------------------------------------------------------------------------- region losses
def _region_case():
    outputs = torch.tensor([[[0.9, 0.1], [0.8, 0.2]], [[0.0, 0.0], [0.0, 0.0]]])[None]  # 1x2x2x2
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])[None]
    # class 0: tp = .9 + .8 + .2 = 1.9, fp = .1, fn = .1 + .2 + .8 = 1.1; class 1: empty
    return outputs, targets, (1.9, 0.1, 1.1)


@pytest.mark.parametrize(
    ("loss", "score"),
    [
        (losses.IoULoss, lambda tp, fp, fn: tp / (tp + fp + fn)),
        (losses.DiceLoss, lambda tp, fp, fn: 2 * tp / (2 * tp + fp + fn)),
        (lambda **kw: losses.TrevskyLoss(alpha=0.7, **kw), lambda tp, fp, fn: tp / (tp + 0.3 * fp + 0.7 * fn)),
    ],
    ids=["iou", "dice", "trevsky"],
)  # fmt: skip
def test_region_losses_equal_hand_computation(loss, score):
    outputs, targets, (tp, fp, fn) = _region_case()
    class0 = score(tp, fp, fn)
    assert loss()(outputs, targets).item() == pytest.approx(1 - (class0 + 1.0) / 2, abs=1e-6)
    assert loss(mode="micro")(outputs, targets).item() == pytest.approx(1 - class0, abs=1e-6)
    weighted = loss(mode="weighted", weights=[0.25, 0.75])(outputs, targets)
    assert weighted.item() == pytest.approx(1 - (0.25 * class0 + 0.75), abs=1e-6)
    assert loss()(targets, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_region_loss_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        losses.IoULoss(mode="per-class")
    with pytest.raises(ValueError, match="needs weights"):
        losses.DiceLoss(mode="weighted")
    with pytest.raises(ValueError, match=r"same shape"):
        losses.IoULoss()(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 3))
    with pytest.raises(ValueError, match="3 weights for 2 classes"):
        losses.IoULoss(mode="weighted", weights=[1, 1, 1])(*_region_case()[:2])


# ---------------------------------------------------------------------------------- layers
def test_layers_shapes_and_values():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    transposed = x.transpose(2, 3)  # non-contiguous
    assert torch.equal(layers.Flatten()(transposed), transposed.reshape(2, -1))
    assert torch.equal(layers.GlobalMaxPool2d()(x), x.amax(dim=(2, 3), keepdim=True))
    assert torch.allclose(layers.GlobalAvgPool2d()(x), x.mean(dim=(2, 3), keepdim=True))
    both = layers.GlobalConcatPool2d()(x)
    assert both.shape == (2, 6, 1, 1) and layers.GlobalConcatPool2d.out_features(3) == 6
    assert torch.equal(both[:, 3:], x.amax(dim=(2, 3), keepdim=True))
    assert layers.GlobalMaxPool2d.out_features(3) == 3
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        layers.GlobalMaxPool2d()(x[0])
    assert torch.equal(layers.Lambda(lambda t: t.view(2, -1))(x), x.view(2, -1))
    block = layers.ResidualBlock(torch.nn.Identity())
    assert torch.equal(block(x), 2 * x)
    unit = layers.Normalize()(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(unit, torch.tensor([[0.6, 0.8]]))
    with pytest.raises(TypeError, match="callable"):
        layers.Lambda(3)
    with pytest.raises(TypeError, match="unknown"):
        layers.Normalize(axis=1)


def test_gaussian_noise_only_in_training():
    noise = layers.GaussianNoise(stddev=0.5)
    x = torch.zeros(20000)
    torch.manual_seed(0)
    noisy = noise(x)
    assert noisy.std().item() == pytest.approx(0.5, rel=0.05) and abs(noisy.mean().item()) < 0.02
    assert torch.equal(noise.eval()(x), x)


def test_contrib_nn_namespace_and_models():
    assert cnn.Linear is torch.nn.Linear and cnn.functional is torch.nn.functional
    assert cnn.TripletMarginLossWithSampler is losses.TripletMarginLossWithSampler
    assert contrib.Normalize is layers.Normalize and contrib.IoULoss is losses.IoULoss
    with pytest.raises(AttributeError, match="neither ddprun.contrib.nn nor torch.nn"):
        cnn.NoSuchLayer  # noqa: B018
    torch.manual_seed(0)
    simple = models.MnistSimpleNet(out_features=16)
    out = simple(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert all(key.startswith("_net.") for key in simple.state_dict())  # Catalyst's keys
    raw = models.MnistSimpleNet(out_features=4, normalize=False)(torch.randn(2, 1, 28, 28))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))
    assert models.MnistBatchNormNet(out_features=5)(torch.randn(4, 1, 28, 28)).shape == (4, 5)
    with pytest.raises(ValueError, match="out_features must be >= 1"):
        models.MnistSimpleNet(out_features=0)
