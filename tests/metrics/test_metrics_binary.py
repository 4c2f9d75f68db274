"""Binary (single-logit) outputs: thresholded, never truncated, and equal to scikit-learn.

Every shape pair (B,) / (B, 1) outputs x (B,) / (B, 1) targets, int and float targets, goes through
the functional and the stateful metrics and is compared with scikit-learn on `logits > threshold`.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from ddprun import metrics
from ddprun.callbacks.metric import (
    AccuracyCallback,
    ConfusionMatrixCallback,
    PrecisionRecallF1SupportCallback,
)
from ddprun.metrics import (
    AccuracyMetric,
    ConfusionMatrixMetric,
    MulticlassPrecisionRecallF1SupportMetric,
)
from ddprun.metrics import functional as F

OUTPUT_SHAPES = ("flat", "column")
TARGET_KINDS = ("flat-int", "column-int", "flat-float", "column-float")


def _data(seed: int = 0, num_samples: int = 203) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of magnitude up to ~10 (truncating them to class ids would be badly wrong) and
    0/1 targets the logits predict about 80% of the time."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(num_samples, generator=generator)
    noise = 3.0 * torch.randn(num_samples, generator=generator)
    targets = (logits + noise > 0).long()
    return logits, targets


def _shaped(logits, targets, output_shape, target_kind):
    outputs = logits.unsqueeze(1) if output_shape == "column" else logits
    shaped = targets.unsqueeze(1) if target_kind.startswith("column") else targets
    shaped = shaped.float() if target_kind.endswith("float") else shaped
    return outputs, shaped


def _sk_prf(targets, predictions, average, zero_division=0):
    return precision_recall_fscore_support(
        targets, predictions, labels=[0, 1], average=average, zero_division=zero_division
    )


def _assert_prf_matches(result, targets, predictions, zero_division=0):
    """`result` is a PrecisionRecallF1Support; checks per class and every average."""
    expected = _sk_prf(targets, predictions, None, zero_division)
    for ours, reference in zip(result.per_class, expected):
        np.testing.assert_allclose(ours.numpy(), reference, atol=1e-12)
    for average in ("micro", "macro", "weighted"):
        reference = _sk_prf(targets, predictions, average, zero_division)[:3]
        got = [value.item() for value in getattr(result, average)]
        np.testing.assert_allclose(got, reference, atol=1e-12, err_msg=average)


@pytest.mark.parametrize("output_shape", OUTPUT_SHAPES)
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
def test_functional_binary_metrics_match_sklearn(output_shape, target_kind):
    logits, targets = _data(1)
    outputs, shaped = _shaped(logits, targets, output_shape, target_kind)
    predictions = (logits > 0).long().numpy()
    truth = targets.numpy()
    expected_accuracy = accuracy_score(truth, predictions)
    assert 0.6 < expected_accuracy < 0.95  # neither trivial nor chance
    (value,) = metrics.accuracy(outputs, shaped)
    assert value.item() == pytest.approx(expected_accuracy, abs=1e-7)
    precision, recall, f1, support = metrics.precision_recall_fbeta_support(outputs, shaped, 2)
    expected = _sk_prf(truth, predictions, None)
    for ours, reference in zip((precision, recall, f1, support), expected):
        np.testing.assert_allclose(ours.numpy(), reference, atol=1e-12)
    tp, fp, _, counts = F.class_counts(outputs, shaped, 2)
    averages = F.aggregate_prf(tp, fp, counts)
    for average in ("micro", "macro", "weighted"):
        got = [value.item() for value in averages[average]]
        np.testing.assert_allclose(got, _sk_prf(truth, predictions, average)[:3], atol=1e-12)
    matrix = metrics.confusion_matrix(outputs, shaped, 2)
    np.testing.assert_array_equal(matrix.numpy(), sk_confusion_matrix(truth, predictions))


def test_float_logits_are_not_truncated_to_class_ids():
    """The old behaviour cast logits to int64: 2.3 -> class 2, 0.6 -> class 0."""
    logits = torch.tensor([2.3, 0.6, -0.7, 1.5, 0.01, -3.2])
    targets = torch.tensor([1, 1, 0, 1, 1, 0])
    (value,) = metrics.accuracy(logits, targets)
    assert value.item() == 1.0
    assert metrics.confusion_matrix(logits, targets, 2).tolist() == [[2, 0], [0, 4]]


def test_threshold_is_strict_and_changeable():
    logits, targets = _data(2)
    for threshold in (-1.0, 0.0, 1.5):
        predictions = (logits > threshold).long().numpy()
        (value,) = metrics.accuracy(logits, targets, threshold=threshold)
        assert value.item() == pytest.approx(accuracy_score(targets.numpy(), predictions))
        matrix = metrics.confusion_matrix(logits, targets, 2, threshold=threshold)
        expected = sk_confusion_matrix(targets.numpy(), predictions, labels=[0, 1])
        np.testing.assert_array_equal(matrix.numpy(), expected)
    # A score equal to the threshold is class 0 ("> threshold").
    at = torch.tensor([0.0, 0.5, 0.5000001])
    assert F.predicted_labels(at).tolist() == [0, 1, 1]
    assert F.predicted_labels(at, threshold=0.5).tolist() == [0, 0, 1]


def test_probabilities_with_threshold_half_equal_logits_with_zero():
    logits, targets = _data(3)
    probabilities = torch.sigmoid(logits)
    # sigmoid(x) > 0.5 exactly when x > 0, except for logits that round to 0.5 in float32.
    assert not ((logits.abs() < 1e-6).any())
    assert metrics.accuracy(probabilities, targets, threshold=0.5) == metrics.accuracy(
        logits, targets
    )
    for a, b in zip(
        metrics.precision_recall_fbeta_support(probabilities, targets, 2, threshold=0.5),
        metrics.precision_recall_fbeta_support(logits, targets, 2),
    ):
        assert torch.equal(a, b)
    # Without the threshold every probability is a positive logit: all predicted class 1.
    (value,) = metrics.accuracy(probabilities, targets)
    assert value.item() == pytest.approx(targets.double().mean().item())


def test_label_smoothed_float_targets_round_to_zero_one():
    logits, targets = _data(4)
    smoothed = targets.double() * 0.9 + 0.05  # 0.05 / 0.95, as with BCE label smoothing
    assert metrics.accuracy(logits, smoothed) == metrics.accuracy(logits, targets)


def _batches(*tensors, size=37):
    return list(zip(*(t.split(size) for t in tensors)))


@pytest.mark.parametrize("output_shape", OUTPUT_SHAPES)
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("threshold", (0.0, 0.8))
def test_stateful_binary_metrics_match_sklearn(output_shape, target_kind, threshold):
    logits, targets = _data(5)
    outputs, shaped = _shaped(logits, targets, output_shape, target_kind)
    predictions = (logits > threshold).long().numpy()
    truth = targets.numpy()
    accuracy = AccuracyMetric(threshold=threshold)
    prf = MulticlassPrecisionRecallF1SupportMetric(num_classes=2, threshold=threshold)
    confusion = ConfusionMatrixMetric(num_classes=2, threshold=threshold)
    for batch_outputs, batch_targets, batch_logits in _batches(outputs, shaped, logits):
        (batch_value,) = accuracy.update(batch_outputs, batch_targets)
        batch_truth = batch_targets.reshape(-1).long().numpy()
        batch_predictions = (batch_logits > threshold).long().numpy()
        assert batch_value.item() == pytest.approx(accuracy_score(batch_truth, batch_predictions))
        prf.update(batch_outputs, batch_targets)
        confusion.update(batch_outputs, batch_targets)
    assert accuracy.compute() == pytest.approx([accuracy_score(truth, predictions)], abs=1e-12)
    _assert_prf_matches(prf.compute(), truth, predictions)
    key_values = prf.compute_key_value()
    assert key_values["f1/class_01"] == pytest.approx(
        precision_recall_fscore_support(truth, predictions, average="binary")[2], abs=1e-12
    )
    expected_matrix = sk_confusion_matrix(truth, predictions, labels=[0, 1])
    np.testing.assert_array_equal(confusion.compute().numpy(), expected_matrix)


@pytest.mark.parametrize("zero_division", (0, 1))
def test_binary_prf_zero_division_when_class_one_is_never_predicted(zero_division):
    logits, targets = _data(6)
    logits = -logits.abs() - 0.1  # every prediction is class 0
    metric = MulticlassPrecisionRecallF1SupportMetric(num_classes=2, zero_division=zero_division)
    metric.update(logits.unsqueeze(1), targets.float())
    predictions = np.zeros_like(targets.numpy())
    _assert_prf_matches(metric.compute(), targets.numpy(), predictions, zero_division)


def test_callbacks_pass_the_threshold_to_their_metrics():
    logits, targets = _data(7)
    probabilities = torch.sigmoid(logits).unsqueeze(1)
    predictions = (logits > 0).long().numpy()
    truth = targets.numpy()
    accuracy = AccuracyCallback("logits", "targets", threshold=0.5)._make_metric()
    prf = PrecisionRecallF1SupportCallback(
        "logits", "targets", num_classes=2, threshold=0.5
    )._make_metric()
    confusion = ConfusionMatrixCallback(
        "logits", "targets", num_classes=2, threshold=0.5
    )._make_metric()
    accuracy.update(probabilities, targets)
    prf.update(probabilities, targets)
    confusion.update(probabilities, targets)
    assert accuracy.compute() == pytest.approx([accuracy_score(truth, predictions)], abs=1e-12)
    _assert_prf_matches(prf.compute(), truth, predictions)
    np.testing.assert_array_equal(
        confusion.compute().numpy(), sk_confusion_matrix(truth, predictions)
    )


BAD_PAIRS = [
    ((8, 1), (8, 2), "ambiguous"),  # single logit with one-hot / multi-label targets
    ((8,), (8, 3), "ambiguous"),
    ((8,), (9,), "different batch sizes"),
    ((8, 1), (1, 8), "different batch sizes"),  # transposed targets
    ((1, 8), (8,), "different batch sizes"),  # transposed single logits
    ((8, 3), (8, 4), "different numbers of classes"),
    ((8, 2, 1), (8,), "not 1- or 2-dimensional"),
    ((8,), (8, 1, 1), "not 1- or 2-dimensional"),
]


@pytest.mark.parametrize(("output_shape", "target_shape", "why"), BAD_PAIRS)
def test_mismatched_shapes_raise_naming_both(output_shape, target_shape, why):
    outputs = torch.randn(output_shape)
    targets = torch.zeros(target_shape)
    named = f"outputs of shape {tuple(output_shape)} and targets of shape {tuple(target_shape)}"
    pattern = re.escape(named) + f" .*{re.escape(why)}.*expected"
    calls = [
        lambda: metrics.accuracy(outputs, targets),
        lambda: AccuracyMetric().update(outputs, targets),
        lambda: metrics.confusion_matrix(outputs, targets, 2),
        lambda: ConfusionMatrixMetric(num_classes=2).update(outputs, targets),
        lambda: metrics.precision_recall_fbeta_support(outputs, targets, 2),
        lambda: MulticlassPrecisionRecallF1SupportMetric(num_classes=2).update(outputs, targets),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_num_classes_must_fit_the_outputs():
    logits, targets = _data(8, num_samples=10)
    with pytest.raises(ValueError, match=r"shape \(10,\) are binary.*num_classes must be 2.*got "):
        MulticlassPrecisionRecallF1SupportMetric(num_classes=3).update(logits, targets)
    with pytest.raises(ValueError, match=r"shape \(10, 1\) are binary.*got num_classes=1"):
        metrics.confusion_matrix(logits.unsqueeze(1), targets, 1)
    scores = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"\(10, 4\) score 4 classes, but num_classes=5"):
        ConfusionMatrixMetric(num_classes=5).update(scores, targets)
    # Integer outputs are predicted labels: no threshold, any class count.
    labels = torch.tensor([0, 1, 2, 2])
    assert metrics.confusion_matrix(labels, torch.tensor([0, 1, 1, 2]), 3).trace().item() == 3


def test_binary_accuracy_allows_only_top1():
    logits, targets = _data(9, num_samples=10)
    with pytest.raises(ValueError, match=r"k=2 and C=1"):
        metrics.accuracy(logits, targets, topk=(1, 2))


def test_multiclass_top1_keeps_its_four_op_path(monkeypatch):
    """(B, C) logits with (B,) class indices must not reach the general (checked) path."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=generator)
    targets = torch.randint(0, 5, (64,), generator=generator)
    expected = metrics.accuracy(logits, targets)[0]

    def general_path(*args, **kwargs):
        raise AssertionError("the multiclass top-1 update left the fast path")

    monkeypatch.setattr(F, "topk_correct", general_path)
    monkeypatch.setattr(F, "check_shapes", general_path)
    metric = AccuracyMetric()
    (value,) = metric.update(logits, targets)
    assert torch.equal(value, expected)
    # A batch-size mismatch leaves the fast path and is rejected there, not broadcast.
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different batch sizes"):
        metric.update(logits[:1], targets)


def test_binary_updates_read_no_tensor_value(monkeypatch):
    logits, targets = _data(10)
    stateful = [
        AccuracyMetric(threshold=0.3),
        MulticlassPrecisionRecallF1SupportMetric(num_classes=2),
        ConfusionMatrixMetric(num_classes=2),
    ]

    def forbidden(*args, **kwargs):
        raise AssertionError("update() read a tensor value on the host")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for metric in stateful:
        metric.update(logits.unsqueeze(1), targets.float().unsqueeze(1))
    monkeypatch.undo()
    assert stateful[2].compute().sum().item() == logits.numel()
