"""Single-logit (BCEWithLogitsLoss) models (issue 10, item 10): accuracy, precision/recall/F1 and
the confusion matrix are the binary values, equal under `ddprun --nproc 2` and in one process,
and equal to scikit-learn on the final model's thresholded predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from tests.workloads.helpers import ddprun, load_metrics, run, script

pytestmark = pytest.mark.timeout(240)

METRIC_PREFIXES = ("accuracy", "precision/", "recall/", "f1/", "support/")


def _sklearn_keys(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """What AccuracyCallback and PrecisionRecallF1SupportCallback(num_classes=2) must report."""
    expected = {"accuracy01": accuracy_score(targets, predictions)}
    per_class = precision_recall_fscore_support(targets, predictions, labels=[0, 1])
    for name, values in zip(("precision", "recall", "f1", "support"), per_class):
        for c in (0, 1):
            expected[f"{name}/class_{c:02d}"] = float(values[c])
    for average in ("micro", "macro", "weighted"):
        values = precision_recall_fscore_support(
            targets, predictions, labels=[0, 1], average=average
        )
        for name, value in zip(("precision", "recall", "f1"), values[:3]):
            expected[f"{name}/_{average}"] = float(value)
    return expected


@pytest.mark.parametrize("shape", ["column", "flat"])
def test_binary_metrics_two_ranks_equal_one_process_and_sklearn(shape, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    done = run(script("binary_outputs", "--out", str(single), "--shape", shape), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    argv = ddprun(
        2, "binary_outputs", "--out", str(multi), "--shape", shape, "--engine", "ddp",
        "--batch-size", "32",
    )  # fmt: skip
    done = run(argv, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = load_metrics(single), load_metrics(multi)
    assert two["world_size"] == 2

    for loader in ("train", "valid"):
        a, b = one["epoch_metrics"][loader], two["epoch_metrics"][loader]
        keys = [key for key in a if key.startswith(METRIC_PREFIXES)]
        assert len(keys) == 1 + 3 * 3 + 4 * 2, keys  # accuracy01, 3 averages, 2 classes
        assert set(a) == set(b)
        for key in keys:
            assert abs(a[key] - b[key]) <= 1e-6, f"{loader}/{key}: {a[key]} != {b[key]}"
        assert abs(a["loss"] - b["loss"]) <= 1e-5

    for result in (one, two):
        logits = np.asarray(result["valid_logits"])
        targets = np.asarray(result["valid_targets"])
        assert logits.shape == targets.shape == (1001,)
        # Most logits are far from 0 and 1, where truncating them to class ids would go wrong.
        assert (np.abs(logits) > 1).mean() > 0.5
        predictions = (logits > 0).astype(np.int64)
        expected = _sklearn_keys(targets, predictions)
        assert 0.7 < expected["accuracy01"] < 0.99  # trained, but not trivially
        got = result["epoch_metrics"]["valid"]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key
        np.testing.assert_array_equal(
            np.asarray(result["matrix"]), sk_confusion_matrix(targets, predictions)
        )
    # Both runs ended with the same model (so the sklearn references above are the same).
    np.testing.assert_allclose(one["valid_logits"], two["valid_logits"], atol=1e-4)
