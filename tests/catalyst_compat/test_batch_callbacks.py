"""Catalyst 21.12's MetricAggregationCallback and BatchTransformCallback (issue 12, item 4):
values (tensors stay tensors), the aggregate stepping the optimizer, names resolved, errors.
Under ``python -m ddprun --nproc 2``: test_control_callbacks.py."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ddprun import dl
from tests.catalyst_compat.control_helpers import StepRunner, data, losses, train


# ------------------------------------------------------------ MetricAggregation
def _fake_runner(**metrics):
    return SimpleNamespace(
        batch_metrics=dict(metrics), is_infer_loader=False, loader_key="train", batch_size=4
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"metrics": ["a", "b"], "mode": "sum"}, 5.0),
        ({"metrics": ["a", "b"], "mode": "mean"}, 2.5),
        ({"metrics": "b", "mode": "mean", "multiplier": 3.0}, 9.0),
        ({"metrics": None, "mode": "sum"}, 5.0 + 10.0),  # every other key, incl. c
        ({"metrics": {"a": 0.6, "b": 0.4}, "mode": "weighted_sum"}, 0.6 * 2 + 0.4 * 3),
        ({"metrics": {"a": 3.0, "b": 1.0}, "mode": "weighted_mean"}, (3 * 2 + 3) / 4),
        ({"metrics": {"a": 3.0, "b": 1.0}, "mode": "weighted_mean", "multiplier": 2}, 4.5),
        ({"mode": lambda m, runner: m["a"] * m["b"], "multiplier": 0.5}, 3.0),
    ],
)
def test_aggregation_modes_give_the_expected_value(kwargs, expected):
    runner = _fake_runner(a=torch.tensor(2.0), b=torch.tensor(3.0), c=10.0)
    dl.MetricAggregationCallback("out", **kwargs).on_batch_end(runner)
    value = runner.batch_metrics["out"]
    assert isinstance(value, torch.Tensor)  # stays a tensor on the device: no host sync
    assert float(value) == pytest.approx(expected)


def test_batch_aggregate_keeps_the_graph_and_feeds_the_optimizer():
    seen = []

    class Probe(dl.Callback):
        def __init__(self):
            super().__init__(order=dl.CallbackOrder.Optimizer - 1)

        def on_batch_end(self, runner):
            m = runner.batch_metrics
            if runner.is_train_loader:
                assert m["loss"].requires_grad
            seen.append(float((m["loss"] - (0.6 * m["loss_ce"] + 0.4 * m["loss_bce"])).detach()))

    aggregate = dl.MetricAggregationCallback(
        "loss", {"loss_ce": 0.6, "loss_bce": 0.4}, "weighted_sum"
    )
    runner = train([*losses(), aggregate, Probe(), dl.OptimizerCallback("loss")])
    assert aggregate.order == dl.CallbackOrder.MetricAggregation == 40
    assert len(seen) == 2 * (5 + 3) and max(map(abs, seen)) < 1e-6
    for values in runner.epoch_metrics.values():  # the loader value: the mean of the batches'
        assert values["loss"] == pytest.approx(0.6 * values["loss_ce"] + 0.4 * values["loss_bce"])


def test_loader_scope_combines_metric_callbacks_and_batch_averages():
    score = dl.MetricAggregationCallback(
        "score", {"accuracy01": 1.0, "loss_ce": -0.5}, "weighted_sum", scope="loader"
    )
    callbacks = [*losses(), dl.AccuracyCallback("logits", "targets"), score]
    runner = train([*callbacks, dl.OptimizerCallback("loss_ce")])
    for values in runner.epoch_metrics.values():
        assert values["score"] == pytest.approx(values["accuracy01"] - 0.5 * values["loss_ce"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"metric_key": ""}, TypeError, "metric_key"),
        ({"metrics": ["a"], "scope": "epoch"}, ValueError, "scope must be 'batch' or 'loader'"),
        ({"metrics": ["a"], "mode": "median"}, ValueError, "mode must be one of"),
        ({"metrics": {"a": 1.0}, "mode": "mean"}, ValueError, "weighted_sum"),
        ({"metrics": ["a", "b"], "mode": "weighted_sum"}, ValueError, "non-empty dict"),
        ({"metrics": {"a": 1, "b": -1}, "mode": "weighted_mean"}, ValueError, "sum to 0"),
        ({"metrics": {"a": "x"}, "mode": "weighted_sum"}, TypeError, "weight of 'a'"),
        ({"metrics": 3}, TypeError, "metrics must be"),
    ],
)
def test_aggregation_bad_arguments_are_named(kwargs, error, match):
    kwargs = {"metric_key": "loss", **kwargs}
    with pytest.raises(error, match=match):
        dl.MetricAggregationCallback(**kwargs)


def test_aggregation_missing_key_names_it_and_the_keys_present():
    aggregate = dl.MetricAggregationCallback("loss", ["loss_ce", "loss_focal"])
    with pytest.raises(KeyError, match=r"no \['loss_focal'\].*loss_bce.*loss_ce"):
        train([*losses(), aggregate, dl.OptimizerCallback("loss")])


# --------------------------------------------------------------- BatchTransform
class _Scores(dl.Callback):
    def __init__(self, key="scores"):
        super().__init__(order=dl.CallbackOrder.Metric)
        self.key, self.checked = key, 0

    def on_batch_end(self, runner):
        expected = torch.softmax(runner.batch["logits"], dim=1)
        assert torch.allclose(runner.batch[self.key], expected)
        self.checked += 1


@pytest.mark.parametrize("transform", ["F.softmax", "softmax", "torch.softmax"])
def test_transform_by_name_with_kwargs_after_the_batch(transform):
    probe = _Scores()
    callback = dl.BatchTransformCallback(
        transform, "on_batch_end", "logits", "scores", transform_kwargs={"dim": 1}
    )
    train([*losses(), callback, probe, dl.OptimizerCallback("loss_ce")], num_epochs=1)
    assert callback.order == dl.CallbackOrder.Internal and probe.checked == 5 + 3


def test_transform_of_the_whole_batch_before_handle_batch():
    seen = []

    class Doubled(StepRunner):
        def handle_batch(self, batch):
            seen.append(torch.equal(batch[0], batch[3] * 2))
            super().handle_batch(batch[:3])

    def double(batch):
        x, y, ids = batch
        return [x * 2, y, ids, x]

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    Doubled().train(
        model=model,
        loaders={"valid": DataLoader(data(), 8)},
        callbacks=[dl.BatchTransformCallback(double, "on_batch_start")],
        loggers={},
    )
    assert seen == [True] * 5


def test_transform_several_keys_and_a_class_name():
    probe = _Scores("probs")
    callbacks = [
        dl.BatchTransformCallback(
            lambda logits, x: (torch.softmax(logits, 1), x.sum(1)),
            "on_batch_end",
            ["logits", "features"],
            ["probs", "xsum"],
        ),
        dl.BatchTransformCallback("torch.nn.Sigmoid", "on_batch_end", "xsum"),  # in place
        probe,
    ]
    train([*losses(), *callbacks, dl.OptimizerCallback("loss_ce")], num_epochs=1)
    assert probe.checked == 8


def test_transform_chain_and_pickling_of_lambdas():
    callback = dl.BatchTransformCallback([lambda v: v + 1, "torch.neg"], "on_batch_end", "a", "b")
    callback = pickle.loads(pickle.dumps(callback))
    runner = SimpleNamespace(batch={"a": torch.tensor([1.0, 2.0])})
    callback.on_batch_end(runner)
    assert runner.batch["b"].tolist() == [-2.0, -3.0]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("F.softmax", "on_epoch_end"), {}, ValueError, "scope must be"),
        (("F.not_a_function", "on_batch_end"), {}, ValueError, "'F.not_a_function' not found"),
        (("no_such_pkg.fn", "on_batch_end"), {}, ValueError, "'no_such_pkg.fn' not found"),
        ((3, "on_batch_end"), {}, TypeError, "transform must be a callable"),
        (("F.relu", "on_batch_end"), {"output_key": "y"}, ValueError, "needs an input_key"),
        (("F.relu", "on_batch_end"), {"input_key": 5}, TypeError, "input_key must be"),
        (([len, len], "on_batch_end"), {"transform_kwargs": {"a": 1}}, ValueError, "single"),
    ],
)
def test_transform_bad_arguments_are_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        dl.BatchTransformCallback(*args, **kwargs)


def test_transform_result_count_and_missing_key_are_named():
    runner = SimpleNamespace(batch={"a": torch.ones(2)})
    two = dl.BatchTransformCallback(lambda a: a, "on_batch_end", "a", ["b", "c"])
    with pytest.raises(ValueError, match=r"needs 2 results from the transform, got Tensor"):
        two.on_batch_end(runner)
    with pytest.raises(KeyError, match=r"no key 'z' \(keys present: \['a'\]\)"):
        dl.BatchTransformCallback(len, "on_batch_end", "z").on_batch_end(runner)
