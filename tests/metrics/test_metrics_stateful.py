"""Stateful metrics: several batches equal the functional metric (and sklearn) on all the data."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

from ddprun import metrics
from ddprun.metrics import (
    AccuracyMetric,
    AdditiveMetric,
    ConfusionMatrixMetric,
    Metric,
    MulticlassPrecisionRecallF1SupportMetric,
)


def _batches(logits, targets, size=37):
    return list(zip(logits.split(size), targets.split(size)))


@pytest.mark.parametrize("seed", (0, 1))
def test_accuracy_metric_over_batches_equals_functional(make_data, seed):
    logits, targets = make_data(seed, num_classes=10)
    metric = AccuracyMetric(topk=(1, 3, 5))
    for batch_logits, batch_targets in _batches(logits, targets):
        batch_values = metric.update(batch_logits, batch_targets)
        expected = metrics.accuracy(batch_logits, batch_targets, (1, 3, 5))
        assert all(v.dim() == 0 for v in batch_values)
        assert torch.allclose(torch.stack(batch_values), torch.stack(expected))
    whole = [v.item() for v in metrics.accuracy(logits, targets, (1, 3, 5))]
    assert metric.compute() == pytest.approx(whole, abs=1e-6)
    key_values = metric.compute_key_value()
    assert list(key_values) == ["accuracy01", "accuracy03", "accuracy05"]
    assert list(key_values.values()) == pytest.approx(whole, abs=1e-6)


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32))
def test_top1_accuracy_fast_path_equals_the_general_one(make_data, dtype):
    """Top-1 with class-index targets takes a four-op path; one-hot targets take the general
    one. Both must count the same."""
    logits, targets = make_data(3, num_classes=10)
    fast, general = AccuracyMetric(topk=(1,)), AccuracyMetric(topk=(1,))
    for batch_logits, batch_targets in _batches(logits, targets):
        one_hot = torch.nn.functional.one_hot(batch_targets, 10)  # (B, C): the general path
        value = fast.update(batch_logits, batch_targets.to(dtype))
        expected = general.update(batch_logits, one_hot)
        assert value[0].dtype == expected[0].dtype == torch.get_default_dtype()
        assert value[0].dim() == 0 and torch.equal(value[0], expected[0])
    assert torch.equal(fast.correct, general.correct) and torch.equal(fast.total, general.total)
    assert fast.compute() == general.compute()
    assert fast.compute() == pytest.approx([metrics.accuracy(logits, targets)[0].item()])


def test_accuracy_metric_batch_keys_and_empty_value(make_data):
    logits, targets = make_data(0)
    metric = AccuracyMetric(topk=(1, 3))
    assert all(math.isnan(v) for v in metric.compute())
    batch = metric.update_key_value(logits, targets)
    assert list(batch) == ["accuracy01", "accuracy03"]
    assert isinstance(batch["accuracy01"], torch.Tensor)
    with pytest.raises(ValueError):
        AccuracyMetric(topk=())


@pytest.mark.parametrize("seed", (0, 1, 2))
@pytest.mark.parametrize("zero_division", (0, 1))
def test_prf_metric_matches_sklearn(make_data, seed, zero_division):
    logits, targets = make_data(seed)
    metric = MulticlassPrecisionRecallF1SupportMetric(num_classes=7, zero_division=zero_division)
    for batch in _batches(logits, targets):
        metric.update(*batch)
    values = metric.compute_key_value()

    def sklearn(average):
        return precision_recall_fscore_support(
            targets.numpy(),
            logits.argmax(1).numpy(),
            labels=list(range(7)),
            average=average,
            zero_division=zero_division,
        )

    for average in ("micro", "macro", "weighted"):
        precision, recall, f1, _ = sklearn(average)
        got = [values[f"{name}/_{average}"] for name in ("precision", "recall", "f1")]
        assert got == pytest.approx([precision, recall, f1], abs=1e-12), average
    for name, expected in zip(("precision", "recall", "f1", "support"), sklearn(None)):
        got = [values[f"{name}/class_{c:02d}"] for c in range(7)]
        assert got == pytest.approx(list(expected), abs=1e-12), name
    assert len(values) == 9 + 4 * 7


def test_prf_metric_compute_structure_and_functional_agreement(make_data):
    logits, targets = make_data(7)
    metric = MulticlassPrecisionRecallF1SupportMetric(num_classes=7)
    result = metric(logits, targets)
    per_class = metrics.precision_recall_fbeta_support(logits, targets, 7)
    for ours, functional in zip(result.per_class, per_class):
        assert torch.equal(ours, functional.double())
    assert result.micro[0].dim() == 0
    with pytest.raises(ValueError):
        MulticlassPrecisionRecallF1SupportMetric(num_classes=3, zero_division=0.5)


def test_confusion_matrix_metric_counts_and_normalisation(make_data):
    logits, targets = make_data(2)
    counts = ConfusionMatrixMetric(num_classes=7)
    normalised = ConfusionMatrixMetric(num_classes=7, normalize=True)
    for batch in _batches(logits, targets):
        counts.update(*batch)
        normalised.update(*batch)
    expected = sk_confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=range(7))
    np.testing.assert_array_equal(counts.compute().numpy(), expected)
    rows = normalised.compute()
    assert rows.dtype == torch.float64
    # The last class is never a target: its row stays 0 instead of 0/0.
    assert torch.equal(rows[6], torch.zeros(7, dtype=torch.float64))
    assert torch.allclose(rows[:6].sum(1), torch.ones(6, dtype=torch.float64))
    assert counts.compute_key_value() == {}


def test_additive_metric_matches_numpy_on_expanded_samples():
    generator = np.random.default_rng(0)
    values = generator.normal(2.0, 0.5, size=23)
    counts = generator.integers(1, 40, size=23)
    metric = AdditiveMetric(metric_key="loss")
    for i, (value, count) in enumerate(zip(values, counts)):
        # Mix floats and tensors that still carry a graph, as a runner would pass losses.
        if i % 2:
            tensor = torch.tensor(value, requires_grad=True) * 1.0
            metric.update(tensor, int(count))
        else:
            metric.update(float(value), int(count))
    expanded = np.repeat(values, counts)
    mean, std = metric.compute()
    assert mean == pytest.approx(expanded.mean(), abs=1e-9)
    assert std == pytest.approx(expanded.std(ddof=1), abs=1e-9)
    assert metric.compute_key_value() == {"loss": mean, "loss/std": std}


def test_additive_metric_edge_cases():
    metric = AdditiveMetric()
    assert all(math.isnan(v) for v in metric.compute())
    metric.update(torch.tensor(3.0), 1)
    assert metric.compute() == (3.0, 0.0)
    metric.reset()
    metric.update(1.5, 8)
    assert metric.compute() == (1.5, 0.0)
    with pytest.raises(ValueError, match="metric_key"):
        metric.compute_key_value()


def test_reset_call_to_and_state_dict(make_data):
    logits, targets = make_data(1)
    metric = AccuracyMetric(topk=(1,), compute_on_call=False)
    correct_storage = metric.correct
    batch_value = metric(logits, targets)
    assert isinstance(batch_value, list) and isinstance(batch_value[0], torch.Tensor)
    saved = metric.state_dict()
    metric.reset()
    assert metric.correct is correct_storage and metric.total.item() == 0
    metric.load_state_dict(saved)
    assert metric.compute() == pytest.approx([batch_value[0].item()])
    assert metric.to("cpu") is metric and metric.device == torch.device("cpu")
    assert metric.reductions == {"correct": "sum", "total": "sum"}


def test_add_state_validation():
    class Bad(Metric):
        def update(self) -> None: ...

        def compute(self) -> None: ...

        def compute_key_value(self) -> dict[str, float]:
            return {}

    bad = Bad()
    with pytest.raises(ValueError, match="reduction"):
        bad.add_state("x", torch.zeros(()), "mean")
    with pytest.raises(ValueError, match="grow"):
        bad.add_state("y", torch.zeros(()), "cat")
    with pytest.raises(ValueError, match="shadows"):
        bad.add_state("reset", torch.zeros(()), "sum")
    with pytest.raises(KeyError):
        bad.replace_states({"nope": torch.zeros(())})


def _forbid_host_reads(monkeypatch):
    """Makes every Python-level way of reading a tensor's value raise."""

    def forbidden(*args, **kwargs):
        raise AssertionError("update() read a tensor value on the host")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_updates_read_no_tensor_value(make_data, monkeypatch):
    logits, targets = make_data(0)
    loss = torch.nn.functional.cross_entropy(logits.requires_grad_(), targets)
    stateful = [
        AccuracyMetric(topk=(1, 3)),
        MulticlassPrecisionRecallF1SupportMetric(num_classes=7),
        ConfusionMatrixMetric(num_classes=7),
    ]
    additive = AdditiveMetric()
    _forbid_host_reads(monkeypatch)
    for metric in stateful:
        metric.update(logits, targets)
    additive.update(loss, 300)
    metrics.accuracy(logits, targets, (1, 2))
    monkeypatch.undo()
    assert additive.compute()[0] == pytest.approx(loss.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect device syncs")
def test_updates_do_not_sync_on_cuda(make_data):
    logits, targets = (t.cuda() for t in make_data(0))
    stateful = [
        AccuracyMetric(topk=(1, 3)).to("cuda"),
        MulticlassPrecisionRecallF1SupportMetric(num_classes=7).to("cuda"),
        ConfusionMatrixMetric(num_classes=7).to("cuda"),
    ]
    additive = AdditiveMetric().to("cuda")
    loss = torch.nn.functional.cross_entropy(logits, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for metric in stateful:
            metric.update(logits, targets)
        additive.update(loss, 300)
        additive.update(0.5, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stateful[2].compute().sum().item() == 300


@pytest.mark.parametrize("zero_division", (0, 1))
def test_prf_metric_before_any_update_is_zero_division(zero_division):
    metric = MulticlassPrecisionRecallF1SupportMetric(num_classes=3, zero_division=zero_division)
    values = metric.compute_key_value()
    for key, value in values.items():
        assert value == (0.0 if key.startswith("support/") else zero_division), key


def test_package_import_loads_only_torch_and_itself():
    code = (
        "import sys, ddprun.metrics as m; "
        "others = [k for k in sys.modules if k.startswith(('sklearn', 'ddprun.'))]; "
        "assert all(k.startswith('ddprun.metrics') for k in others), others; "
        "assert set(m.__all__) == {'accuracy', 'precision_recall_fbeta_support', "
        "'confusion_matrix', 'Metric', 'AdditiveMetric', 'AdditiveValueMetric', 'AccuracyMetric', "
        "'MulticlassPrecisionRecallF1SupportMetric', 'ConfusionMatrixMetric', 'Collectives', "
        "'synchronized', 'AUCMetric', 'CMCMetric', 'DiceMetric', 'IOUMetric', 'TrevskyMetric', "
        "'MultilabelAccuracyMetric', 'TorchMetric'}; "
        "assert 'torchmetrics' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
