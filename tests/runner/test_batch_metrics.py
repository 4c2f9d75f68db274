"""BatchMetrics (values computed when first read) and the per-batch paths that skip work:
deferred batch accuracies, OptimizerCallback calling torch directly, seeding without CUDA."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

from ddprun import dl
from ddprun.core.batch_metrics import BatchMetrics, Deferred
from ddprun.utils import set_global_seed
from tests.runner.helpers import (
    SupervisedRunner,
    assert_same_state,
    engine,
    linear,
    loader,
    state_of,
)


class Counter:
    """A compute function that counts its calls and returns fixed values."""

    def __init__(self, *values: float) -> None:
        self.values, self.calls = values, 0

    def __call__(self, offset: float = 0.0) -> list[float]:
        self.calls += 1
        return [v + offset for v in self.values]


def deferred(**extra: float) -> tuple[BatchMetrics, Counter]:
    """``{"loss": 1.0, "a1": <deferred 0.5>, "a3": <deferred 0.75>, **extra}``."""
    metrics, compute = BatchMetrics(loss=1.0), Counter(0.5, 0.75)
    metrics.defer(["a1", "a3"], compute)
    metrics.update(extra)
    return metrics, compute


def test_keys_length_and_order_are_there_before_anything_is_computed():
    metrics, compute = deferred(lr=0.1)
    assert list(metrics) == ["loss", "a1", "a3", "lr"] and len(metrics) == 4
    assert "a3" in metrics and sorted(metrics.keys()) == ["a1", "a3", "loss", "lr"]
    assert compute.calls == 0


@pytest.mark.parametrize(
    "read",
    [
        lambda m: m["a1"],
        lambda m: m.get("a3"),
        lambda m: list(m.values()),
        lambda m: list(m.items()),
        lambda m: m.copy(),
        lambda m: dict(m),
        lambda m: {**m},
        lambda m: (lambda **kwargs: kwargs)(**m),
        lambda m: {} | m,
        lambda m: m | {},
        lambda m: m == {},
        lambda m: repr(m),
        lambda m: json.dumps(m),
        lambda m: pickle.loads(pickle.dumps(m)),
        lambda m: copy.deepcopy(m),
    ],
)
def test_every_read_sees_computed_values_computed_once(read):
    metrics, compute = deferred()
    read(metrics)
    expected = {"loss": 1.0, "a1": 0.5, "a3": 0.75}
    assert dict(metrics) == expected and {**metrics} == expected
    assert json.loads(json.dumps(metrics)) == expected
    assert pickle.loads(pickle.dumps(metrics)) == expected
    assert compute.calls == 1
    assert not any(type(v) is Deferred for v in dict.values(metrics))


def test_copies_are_plain_dicts():
    metrics, _ = deferred()
    for made in (metrics.copy(), pickle.loads(pickle.dumps(metrics)), copy.copy(metrics)):
        assert type(made) is dict and made == {"loss": 1.0, "a1": 0.5, "a3": 0.75}


def test_a_later_write_wins_over_a_deferred_value_and_a_later_defer_over_a_write():
    metrics, compute = deferred()
    metrics["a1"] = 9.0  # written after the defer: stays
    assert metrics["a1"] == 9.0 and metrics["a3"] == 0.75
    metrics = BatchMetrics(a1=9.0)
    metrics.defer(["a1"], Counter(0.5))  # deferred after the write: replaces it, same place
    assert metrics == {"a1": 0.5}
    assert compute.calls == 1


def test_pop_setdefault_and_popitem_compute_what_they_return():
    metrics, _ = deferred()
    assert metrics.pop("a1") == 0.5 and "a1" not in metrics
    assert metrics.setdefault("a3", 0.0) == 0.75 and metrics.setdefault("new", 2.0) == 2.0
    assert metrics.popitem() == ("new", 2.0) and metrics.get("missing", -1) == -1
    assert metrics.pop("missing", None) is None


def test_compute_gets_its_arguments_and_a_wrong_count_of_values_is_an_error():
    metrics = BatchMetrics()
    metrics.defer(["x", "y"], Counter(1.0, 2.0), 10.0)
    assert metrics["y"] == 12.0 and metrics["x"] == 11.0
    metrics.defer(["z"], Counter(1.0, 2.0))
    with pytest.raises(ValueError):
        metrics["z"]


class ReadsAccuracy(dl.Callback):
    """Reads every batch's accuracy after the metric callbacks, next to a hand computation."""

    def __init__(self) -> None:
        super().__init__(order=dl.CallbackOrder.External)
        self.read: list[float] = []
        self.expected: list[float] = []

    def on_batch_end(self, runner) -> None:
        batch = runner.batch
        self.read.append(float(runner.batch_metrics["accuracy01"]))
        correct = (batch["logits"].argmax(dim=1) == batch["targets"]).sum().item()
        self.expected.append(correct / len(batch["targets"]))


def classification_loaders() -> dict:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(48, 4, generator=generator)
    targets = torch.randint(0, 3, (48,), generator=generator)
    data = torch.utils.data.TensorDataset(features, targets)
    return {"train": torch.utils.data.DataLoader(data, batch_size=10)}


def accuracy_run(*extra: dl.Callback, log_on_batch: bool = True) -> tuple[dl.SupervisedRunner, int]:
    import ddprun.callbacks.metric as metric_callbacks

    computed = []
    original = metric_callbacks.batch_accuracies

    def counting(*args):
        computed.append(1)
        return original(*args)

    metric_callbacks.batch_accuracies = counting
    try:
        runner = dl.SupervisedRunner()
        accuracy = dl.AccuracyCallback("logits", "targets", log_on_batch=log_on_batch)
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        runner.train(
            model=model,
            criterion=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loaders=classification_loaders(),
            callbacks=[accuracy, *extra],
            num_epochs=2,  # the second loader start must not compute the last batch's
            verbose=False,
        )
    finally:
        metric_callbacks.batch_accuracies = original
    return runner, len(computed)


def test_batch_accuracy_is_computed_only_when_read_and_then_right():
    runner, computed = accuracy_run()
    assert computed == 0  # nothing read the batch values
    assert type(runner.batch_metrics) is BatchMetrics and "accuracy01" in runner.batch_metrics
    reader = ReadsAccuracy()
    _, computed = accuracy_run(reader)
    assert computed == 10 and reader.read == pytest.approx(reader.expected)
    _, computed = accuracy_run(log_on_batch=False)
    assert computed == 0


def test_a_runner_that_sets_a_plain_dict_still_gets_batch_accuracies():
    class PlainDict(dl.SupervisedRunner):
        def handle_batch(self, batch):
            super().handle_batch(batch)
            self.batch_metrics = {}  # as a Catalyst runner may

    reader = ReadsAccuracy()
    model = nn.Linear(4, 3)
    PlainDict().train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders=classification_loaders(),
        callbacks=[dl.AccuracyCallback("logits", "targets"), reader],
        num_epochs=1,
        verbose=False,
    )
    assert len(reader.read) == 5 and reader.read == pytest.approx(reader.expected)


class CountingEngine(dl.DeviceEngine):
    steps = 0

    def optimizer_step(self, optimizer) -> None:
        CountingEngine.steps += 1
        super().optimizer_step(optimizer)


def optimizer_run(run_engine, model) -> None:
    SupervisedRunner().train(
        model=model,
        loaders={"train": loader(40, 4)},
        criterion=nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        callbacks={
            "criterion": dl.CriterionCallback("logits", "targets"),
            "optimizer": dl.OptimizerCallback(),
        },
        engine=run_engine,
        loggers={},
        num_epochs=2,
    )


def test_optimizer_callback_calls_torch_directly_only_for_the_plain_steps():
    assert engine().steps_as_torch()
    assert not CountingEngine("cpu").steps_as_torch()
    patched = engine()
    patched.zero_grad = lambda optimizer: None
    assert not patched.steps_as_torch()
    assert not dl.AMPEngine("cpu", dtype="bf16").steps_as_torch()
    # an engine that replaces a step still has it called, and both paths train alike
    direct, layered = linear(), linear()
    optimizer_run(engine(), direct)
    CountingEngine.steps = 0
    optimizer_run(CountingEngine("cpu"), layered)
    assert CountingEngine.steps == 20
    assert_same_state(state_of(direct), state_of(layered))


def test_seeding_without_an_accelerator_draws_what_torch_manual_seed_draws():
    set_global_seed(123)
    ours = torch.rand(5), torch.randn(3)
    torch.manual_seed(123)
    assert torch.equal(ours[0], torch.rand(5)) and torch.equal(ours[1], torch.randn(3))
