"""Catalyst 21.12's metric callbacks (issue 12, items 4 and 10): values against scikit-learn in
one process, the same values on 2 and 3 ranks (uneven splits, a rank without batches), and the
loader end still one all-reduce (+ one all-gather only with "cat" states) with torchmetrics
metrics in the mix."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    jaccard_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)
from sklearn.preprocessing import label_binarize

from ddprun import dl
from ddprun.metrics import AUCMetric, CMCMetric, IOUMetric, TorchMetric, TrevskyMetric
from tests.workloads.helpers import run

pytest.importorskip("torchmetrics")
SCRIPT = Path(__file__).parent / "scripts" / "metric_callbacks.py"
pytestmark = pytest.mark.timeout(240)
SUM = ["all_reduce:sum"]
GATHER = ["all_reduce:sum", "all_gather"]
EVERY = ["all_reduce:sum", "all_reduce:max", "all_gather"]


def _script():
    spec = importlib.util.spec_from_file_location("metric_callbacks_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _script()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, every metric: the epoch metrics of the last epoch, by loader."""
    folder = tmp_path_factory.mktemp("single")
    runner = mc.run(folder / "every", "every")
    return runner.epoch_metrics


def _loader_data(loader: str) -> dict[str, np.ndarray]:
    index = list(mc.SIZES).index(loader)
    return {k: v.numpy() for k, v in mc.make_data(mc.SIZES[loader][0], seed=index).items()}


def _topk(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    return top_k_accuracy_score(targets, logits, k=k, labels=range(mc.CLASSES))


def _pixels(masks: np.ndarray) -> np.ndarray:
    """(N, K, H, W) -> (N*H*W, K), the layout scikit-learn's multilabel scores take."""
    return masks.transpose(0, 2, 3, 1).reshape(-1, masks.shape[1])


def _cmc(embeddings, labels, is_query, k: int) -> float:
    """CMC@k by hand: a query hits when fewer than k other-label gallery items are at most as
    far as its nearest same-label item."""
    gallery, gallery_labels = embeddings[~is_query], labels[~is_query]
    hits = []
    for query, label in zip(embeddings[is_query], labels[is_query]):
        distances = np.sqrt(((gallery - query) ** 2).sum(axis=1))
        same = gallery_labels == label
        if not same.any():
            hits.append(False)
            continue
        hits.append(int((distances[~same] <= distances[same].min()).sum()) < k)
    return float(np.mean(hits))


@pytest.mark.parametrize("loader", ["valid", "valid_small"])
def test_one_process_equals_scikit_learn(single, loader):
    got, d = single[loader], _loader_data(loader)
    y, logits = d["targets"], d["logits"]
    predicted_class = logits.argmax(axis=1)
    expected = {
        "accuracy01": accuracy_score(y, predicted_class),
        "accuracy03": _topk(logits, y, 3),
        "accuracy05": _topk(logits, y, 5),
        "top_accuracy02_b": _topk(logits, y, 2),  # prefix / suffix
        "accuracy": accuracy_score(d["ml_targets"].ravel(), (d["ml_scores"] > 0.5).ravel()),
        "multiclass_accuracy": accuracy_score(y, predicted_class),  # torchmetrics
        "auc_bin": roc_auc_score(d["binary_targets"], d["binary_scores"]),
        "binary_auroc": roc_auc_score(d["binary_targets"], d["binary_probs"]),
        "ml_map": average_precision_score(d["ml_targets"], d["ml_scores"], average="macro"),
        "cmc01": _cmc(d["embeddings"], d["identities"], d["is_query"], 1),
        "cmc05": _cmc(d["embeddings"], d["identities"], d["is_query"], 5),
    }
    # one-vs-rest AUC of the classes that occur (the others are NaN, left out of the means)
    onehot = label_binarize(y, classes=range(mc.CLASSES))
    present = [c for c in range(mc.CLASSES) if 0 < onehot[:, c].sum() < len(y)]
    tied = d["tied_logits"]
    per_class = roc_auc_score(onehot[:, present], tied[:, present], average=None)
    for c in range(mc.CLASSES):
        key = f"auc/class_{c:02d}"
        assert (c in present) != math.isnan(got[key]), key
    expected.update({f"auc/class_{c:02d}": v for c, v in zip(present, per_class)})
    expected["auc"] = expected["auc/_macro"] = float(np.mean(per_class))
    weights = onehot[:, present].sum(axis=0)
    expected["auc/_weighted"] = float((per_class * weights).sum() / weights.sum())
    expected["auc/_micro"] = roc_auc_score(onehot.ravel(), tied.ravel())
    for average in ("micro", "macro", "weighted"):
        value = roc_auc_score(d["ml_targets"], d["ml_scores"], average=average)
        expected[f"ml_auc/_{average}"] = value
    # segmentation: IoU = Jaccard, Dice = F1 over pixels, per class (eps-smoothed to ~1e-9)
    truth, predicted = _pixels(d["masks"]), _pixels(d["soft"] > 0.5)
    iou = jaccard_score(truth, predicted, average=None)
    dice = f1_score(truth, predicted, average=None)
    expected.update({f"iou/class_{c:02d}": v for c, v in enumerate(iou)})
    expected.update({f"dice/{n}": v for n, v in zip(["sky", "road", "car"], dice)})
    expected["iou/_micro"] = jaccard_score(truth, predicted, average="micro")
    expected["iou"] = expected["iou/_macro"] = iou.mean()
    expected["dice/_micro"] = f1_score(truth, predicted, average="micro")
    expected["dice"] = expected["dice/_macro"] = dice.mean()
    expected["dice/_weighted"] = float((dice * np.array([0.2, 0.3, 0.5])).sum())
    # soft Tversky (no threshold), alpha 0.3 on false negatives, beta 0.7 on false positives
    soft, masks = _pixels(d["soft"]).astype(np.float64), truth
    tp = (soft * masks).sum(axis=0)
    tversky = tp / (tp + 0.7 * (soft.sum(axis=0) - tp) + 0.3 * (masks.sum(axis=0) - tp))
    expected["trevsky"] = tversky.mean()
    # torchmetrics metric with every reduction, and the runner-held meters
    b, t = d["binary_scores"].astype(np.float64), d["binary_targets"]
    expected.update(
        {
            "er_total": b.sum(),
            "er_top": b.max(),
            "er_low": b.min(),
            "er_scale": 3.0,
            "er_rows": len(b),
            "er_rows_dot": (b * t).sum(),
            "er_per_update": t.sum(),
            "er_custom/class_00": t.sum(),
            "er_custom/class_01": len(t),
            # torchmetrics' macro accuracy: recall averaged over the classes seen or predicted
            "runner_macro_accuracy": recall_score(
                y, predicted_class, labels=np.union1d(y, predicted_class), average="macro"
            ),
            "runner_weighted_recall": accuracy_score(y, predicted_class),
        }
    )
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # float32 sums: rel


def _load(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _assert_same(single: dict, multi: dict) -> None:
    """Every loader's every key equal to 1e-6 (NaN where one process has NaN)."""
    for loader, values in single.items():
        if loader.startswith("_"):
            continue
        assert values.keys() == multi[loader].keys(), loader
        for key, value in values.items():
            other = multi[loader][key]
            if math.isnan(value):
                assert math.isnan(other), (loader, key, other)
            else:
                assert other == pytest.approx(value, abs=1e-6), (loader, key)


def _ops(folder: Path, ranks: int) -> list[list[list[str]]]:
    return [json.loads((folder / f"ops_rank{r}.json").read_text()) for r in range(ranks)]


def test_two_ranks_launched_equal_one_process_and_cost_one_reduction(single, tmp_path):
    """ddprun --nproc 2: the same values; each of the 6 loader ends (3 loaders x 2 epochs) is
    one all-reduce with sum states only, plus one all-gather once scores are kept."""
    argv = [sys.executable, "-m", "ddprun", "--nproc", "2", str(SCRIPT)]
    done = run([*argv, "--out", str(tmp_path), "--engine", "ddp", "--sets", "sums,all"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for which, ops in (("sums", SUM), ("all", GATHER)):
        result = _load(tmp_path / which)
        assert result["world_size"] == 2
        keys = set(result["epoch_metrics"]["valid"])
        trimmed = {
            loader: {k: v for k, v in values.items() if k in keys}
            for loader, values in single.items()
        }
        _assert_same(trimmed, result["epoch_metrics"])
        assert _ops(tmp_path / which, 2) == [[ops] * 6] * 2, which
    # the sums-only set really has torchmetrics (and the runner's meters) in it
    sums = set(_load(tmp_path / "sums")["epoch_metrics"]["valid"])
    assert {"multiclass_accuracy", "runner_macro_accuracy", "runner_weighted_recall"} <= sums


def test_three_ranks_spawned_equal_one_process(single, tmp_path):
    """Spawn mode, 3 ranks (1001 = 334 + 334 + 333; the 2-sample loader leaves rank 2 without
    a batch): every key equal, max/min states add exactly one max all-reduce."""
    argv = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--engine", "ddp"]
    done = run([*argv, "--world-size", "3", "--sets", "every"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = _load(tmp_path / "every")
    assert result["world_size"] == 3
    _assert_same(single, result["epoch_metrics"])
    assert _ops(tmp_path / "every", 3) == [[EVERY] * 6] * 3


# ------------------------------------------------------------------ arguments and errors


@pytest.mark.parametrize(
    ("num_classes", "keys"),
    [
        (None, ["accuracy01"]),
        (3, ["accuracy01"]),
        (4, ["accuracy01", "accuracy03"]),
        (10, ["accuracy01", "accuracy03", "accuracy05"]),
    ],
)
def test_accuracy_default_topk_follows_catalyst(num_classes, keys):
    callback = dl.AccuracyCallback("logits", "targets", num_classes=num_classes)
    assert callback.keys == keys
    explicit = dl.AccuracyCallback("logits", "targets", topk_args=(2,), num_classes=10)
    assert explicit.keys == ["accuracy02"]
    affixed = dl.AccuracyCallback("l", "t", topk_args=(1,), prefix="p_", suffix="/s", threshold=0.5)
    assert affixed.keys == ["p_accuracy01/s"] and affixed.threshold == 0.5


def test_batch_values_are_device_tensors_and_loader_keys_affixed():
    data = mc.make_data(64)
    batch = {k: v[:16] for k, v in data.items()}
    ml = dl.MultilabelAccuracyCallback("ml_scores", "ml_targets", prefix="x_")._make_metric()
    value = ml.update_key_value(batch["ml_scores"], batch["ml_targets"])
    assert isinstance(value["x_accuracy"], torch.Tensor)
    iou = IOUMetric(threshold=0.5, weights=[1, 0, 0], suffix="_s")
    values = iou.update_key_value(batch["soft"], batch["masks"])
    assert set(values) == {"iou_s", "iou_s/_weighted"}
    assert values["iou_s/_weighted"].item() == pytest.approx(iou.compute().per_class[0].item())
    assert set(iou.compute_key_value()) == {
        "iou_s/_micro",
        "iou_s",
        "iou_s/_macro",
        "iou_s/_weighted",
    }


def test_bad_inputs_name_what_was_wrong():
    auc = AUCMetric()
    auc.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))  # 3 is no class of 3 columns
    with pytest.raises(ValueError, match="1 target value"):
        auc.compute()
    with pytest.raises(ValueError, match="earlier batches of this loader had 3"):
        auc.update(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"\(4, 2\) do not fit outputs of shape \(4, 3\)"):
        AUCMetric().update(torch.randn(4, 3), torch.zeros(4, 2))
    iou = IOUMetric(class_names=["a", "b"])
    with pytest.raises(ValueError, match="outputs have 3 classes.*expected 2"):
        iou.update(torch.rand(2, 3, 4, 4), torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        iou.update(torch.rand(2, 2, 4, 4), torch.ones(2, 2, 4))
    with pytest.raises(ValueError, match="alpha must lie in"):
        dl.TrevskyCallback("o", "t", alpha=1.5)
    assert TrevskyMetric(alpha=2.0, beta=1.0).beta == 1.0
    with pytest.raises(ValueError, match=r"missing \['is_query'\]"):
        CMCMetric().update(embeddings=torch.randn(2, 3), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="topk_args"):
        dl.CMCScoreCallback("e", "l", "q", topk_args=(0,))


def test_torchmetric_adapter_refuses_what_it_cannot_sync():
    import torchmetrics

    with pytest.raises(TypeError, match="needs a torchmetrics.Metric"):
        TorchMetric(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="wrap each metric"):
        TorchMetric(torchmetrics.MetricCollection([torchmetrics.MeanMetric()]))

    class ListMax(torchmetrics.Metric):
        def __init__(self):
            super().__init__()
            self.add_state("values", [], "max")

        def update(self, x):
            self.values.append(x)

        def compute(self):
            return torch.stack(self.values).max()

    with pytest.raises(TypeError, match="'values' of ListMax is a list reduced by"):
        TorchMetric(ListMax())
    wrapped = TorchMetric(torchmetrics.MeanMetric(sync_on_compute=True, dist_sync_on_step=True))
    assert not wrapped.metric.sync_on_compute and not wrapped.metric.dist_sync_on_step


def test_missing_torchmetrics_is_a_clear_import_error():
    code = (
        "import sys; sys.modules['torchmetrics'] = None\n"
        "from ddprun import dl, metrics\n"  # importing ddprun does not need it
        "try:\n"
        "    dl.TorchMetricsCallback(object(), 'logits', 'targets')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "pip install 'ddprun[torchmetrics]'" in done.stdout


# ------------------------------------------------------------------ no host sync per batch


def _updating_metrics(device: str) -> list:
    """Every metric kind of these callbacks, each with the update its callback makes."""
    callbacks = mc.make_callbacks("all")
    metrics = [(cb._make_metric().to(device), cb) for name, cb in callbacks.items()]
    metrics.append((IOUMetric(weights=[1, 2, 3]).to(device), None))  # known class count
    return [(metric, cb) for metric, cb in metrics if not isinstance(metric, TorchMetric)]


def _update_all(pairs, batch) -> None:
    for metric, callback in pairs:
        if callback is None:
            metric.update_key_value(batch["soft"], batch["masks"])
        elif isinstance(callback, dl.CMCScoreCallback):
            metric.update(batch["embeddings"], batch["identities"], batch["is_query"])
        elif hasattr(metric, "update_key_value"):
            metric.update_key_value(batch[callback.input_key], batch[callback.target_key])
        else:
            metric.update(batch[callback.input_key], batch[callback.target_key])


def test_updates_read_no_tensor_value_on_the_host(monkeypatch):
    data = mc.make_data(64)
    pairs = _updating_metrics("cpu")
    _update_all(pairs, {k: v[:32] for k, v in data.items()})  # first batch: buffers are made

    def forbidden(*args, **kwargs):
        raise AssertionError("update() read a tensor value on the host")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    _update_all(pairs, {k: v[32:] for k, v in data.items()})
    monkeypatch.undo()
    assert all(metric.compute_key_value() for metric, _ in pairs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect device syncs")
def test_updates_do_not_sync_on_cuda():
    data = {k: v.cuda() for k, v in mc.make_data(64).items()}
    pairs = _updating_metrics("cuda")
    _update_all(pairs, {k: v[:32] for k, v in data.items()})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _update_all(pairs, {k: v[32:] for k, v in data.items()})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(metric.compute_key_value() for metric, _ in pairs)
