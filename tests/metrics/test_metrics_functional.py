"""Functional metrics against scikit-learn on random data with empty classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

from ddprun import metrics
from ddprun.metrics import functional as F

SEEDS = (0, 1, 2)


def _sklearn_prf(logits, targets, num_classes, zero_division, average=None, beta=1.0):
    return precision_recall_fscore_support(
        targets.numpy(),
        logits.argmax(1).numpy(),
        labels=list(range(num_classes)),
        average=average,
        zero_division=zero_division,
        beta=beta,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_accuracy_matches_sklearn(make_data, seed):
    logits, targets = make_data(seed, num_classes=10)
    values = metrics.accuracy(logits, targets, topk=(1, 3, 5))
    assert len(values) == 3
    for k, value in zip((1, 3, 5), values):
        assert value.dim() == 0 and value.is_floating_point()
        expected = top_k_accuracy_score(targets.numpy(), logits.numpy(), k=k, labels=range(10))
        assert value.item() == pytest.approx(expected, abs=1e-6)


def test_accuracy_takes_one_hot_and_column_targets(make_data):
    logits, targets = make_data(3)
    one_hot = torch.nn.functional.one_hot(targets, logits.shape[1])
    expected = metrics.accuracy(logits, targets, topk=(1, 2))
    assert torch.equal(
        torch.stack(metrics.accuracy(logits, one_hot, (1, 2))), torch.stack(expected)
    )
    column = targets.unsqueeze(1)
    assert torch.equal(torch.stack(metrics.accuracy(logits, column, (1, 2))), torch.stack(expected))


def test_accuracy_of_label_outputs_compares_labels():
    outputs = torch.tensor([0, 1, 2, 2])
    targets = torch.tensor([0, 1, 1, 2])
    (value,) = metrics.accuracy(outputs, targets)
    assert value.item() == pytest.approx(0.75)
    # Integer (B, 1) outputs are labels too; float (B,) / (B, 1) outputs are binary scores,
    # thresholded (tests/metrics/test_metrics_binary.py).
    (value,) = metrics.accuracy(outputs.unsqueeze(1), targets)
    assert value.item() == pytest.approx(0.75)


def test_accuracy_rejects_k_above_num_classes(make_data):
    logits, targets = make_data(0, num_classes=4)
    with pytest.raises(ValueError, match=r"k=5 and C=4"):
        metrics.accuracy(logits, targets, topk=(1, 5))
    with pytest.raises(ValueError, match=r"k=3 and C=1"):
        metrics.accuracy(targets, targets, topk=(3,))
    with pytest.raises(ValueError, match=r"k=0"):
        metrics.accuracy(logits, targets, topk=(0,))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("zero_division", (0, 1))
@pytest.mark.parametrize("beta", (1.0, 0.5, 2.0))
def test_per_class_prf_matches_sklearn(make_data, seed, zero_division, beta):
    logits, targets = make_data(seed)
    ours = metrics.precision_recall_fbeta_support(logits, targets, 7, beta, zero_division)
    expected = _sklearn_prf(logits, targets, 7, zero_division, beta=beta)
    for value, reference in zip(ours, expected):
        np.testing.assert_allclose(value.numpy(), reference, atol=1e-12)
    assert ours[3].dtype == torch.int64


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("zero_division", (0, 1))
def test_averages_match_sklearn(make_data, seed, zero_division):
    logits, targets = make_data(seed)
    tp, fp, _, support = F.class_counts(logits, targets, 7)
    averages = F.aggregate_prf(tp, fp, support, zero_division=zero_division)
    for average in ("micro", "macro", "weighted"):
        expected = _sklearn_prf(logits, targets, 7, zero_division, average=average)[:3]
        got = [value.item() for value in averages[average]]
        np.testing.assert_allclose(got, expected, atol=1e-12, err_msg=average)


def test_prf_beta_infinity_is_recall(make_data):
    logits, targets = make_data(5)
    precision, recall, fbeta, _ = metrics.precision_recall_fbeta_support(
        logits, targets, 7, beta=float("inf")
    )
    assert torch.equal(fbeta, recall)


def test_class_counts_are_consistent(make_data):
    logits, targets = make_data(4)
    tp, fp, fn, support = F.class_counts(logits, targets, 7)
    predicted = torch.bincount(logits.argmax(1), minlength=7)
    assert torch.equal(tp + fn, support)
    assert torch.equal(tp + fp, predicted)
    assert support.sum().item() == targets.numel()


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_matrix_matches_sklearn(make_data, seed):
    logits, targets = make_data(seed)
    matrix = metrics.confusion_matrix(logits, targets, 7)
    assert matrix.dtype == torch.int64 and matrix.shape == (7, 7)
    expected = sk_confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=range(7))
    np.testing.assert_array_equal(matrix.numpy(), expected)
    from_labels = metrics.confusion_matrix(logits.argmax(1), targets, 7)
    assert torch.equal(from_labels, matrix)


def test_to_labels_rejects_three_dimensions():
    with pytest.raises(ValueError, match="shape"):
        F.to_labels(torch.zeros(2, 3, 4))
