"""Catalyst 21.12's ControlFlowCallback and CheckRunCallback (issue 12, item 4), and all the
control callbacks in real processes: ``python -m ddprun --nproc 2`` equal to one process,
equal batch counts on every rank, and spawn mode with lambdas in the callbacks.
PeriodicLoader/BatchOverfit: test_loader_callbacks.py; aggregation: test_batch_callbacks.py."""

from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ddprun import dl
from ddprun.callbacks.control import unwrap_callback
from tests.catalyst_compat.control_helpers import Passes, StepRunner, data, losses, train
from tests.workloads.helpers import run

SCRIPTS = Path(__file__).parent / "scripts"
pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------ ControlFlow
class _Events(dl.Callback):
    def __init__(self, order=dl.CallbackOrder.Metric, node=dl.CallbackNode.all):
        super().__init__(order=order, node=node)
        self.events = []

    def on_stage_start(self, runner):
        self.events.append(("stage_start",))

    def on_epoch_start(self, runner):
        self.events.append(("epoch_start", runner.stage_epoch_step))

    def on_loader_start(self, runner):
        self.batches = 0

    def on_batch_end(self, runner):
        self.batches += 1

    def on_loader_end(self, runner):
        self.events.append((runner.stage_epoch_step, runner.loader_key, self.batches))

    def on_epoch_end(self, runner):
        self.events.append(("epoch_end", runner.stage_epoch_step))


def _loader_passes(events):
    return [e for e in events if isinstance(e[0], int)]


@pytest.mark.parametrize(
    ("kwargs", "passes"),
    [
        ({"epochs": 2}, [(2, "train"), (2, "valid"), (4, "train"), (4, "valid")]),
        ({"epochs": [1, 3]}, [(1, "train"), (1, "valid"), (3, "train"), (3, "valid")]),
        ({"ignore_epochs": [1, 2, 3]}, [(4, "train"), (4, "valid")]),
        ({"loaders": "valid", "epochs": [2, 3]}, [(2, "valid"), (3, "valid")]),
        ({"loaders": {"train": 1, "valid": [3, 4]}}, [(1, "train"), (3, "valid"), (4, "valid")]),
        ({"ignore_loaders": ["train"], "ignore_epochs": 2}, [(1, "valid"), (3, "valid")]),
        (
            {"ignore_loaders": {"train": [1, 2, 3]}, "epochs": [3, 4]},
            [(3, "valid"), (4, "train"), (4, "valid")],
        ),
        ({"filter_fn": lambda s, e, loader: e == 4 and loader == "train"}, [(4, "train")]),
        (
            {"filter_fn": "lambda stage, epoch, loader: epoch > 3 and stage == 'train'"},
            [(4, "train"), (4, "valid")],
        ),
    ],
)
def test_control_flow_runs_the_callback_where_the_filters_pass(kwargs, passes):
    inner = _Events()
    wrapper = dl.ControlFlowCallback(inner, **kwargs)
    train([*losses(), wrapper, dl.OptimizerCallback("loss_ce")], num_epochs=4)
    assert [(e, k) for e, k, _ in _loader_passes(inner.events)] == passes
    assert all(n == (5 if k == "train" else 3) for _, k, n in _loader_passes(inner.events))
    epochs = sorted({e for e, _ in passes})
    assert [e[1] for e in inner.events if e[0] == "epoch_start"] == epochs
    assert [e[1] for e in inner.events if e[0] == "epoch_end"] == epochs
    assert inner.events[0] == ("stage_start",)  # stage events always reach it


def test_control_flow_global_epochs_and_forwarded_order_and_node():
    inner = _Events(order=dl.CallbackOrder.External, node=dl.CallbackNode.master)
    wrapper = dl.ControlFlowCallback(inner, epochs=[3], use_global_epochs=True)
    assert (wrapper.order, wrapper.node, wrapper.callback) == (inner.order, inner.node, inner)

    class TwoStages(StepRunner):
        stages = ["one", "two"]

        def get_stage_len(self, stage):
            return 2

        def get_loaders(self, stage):
            return {"train": DataLoader(data(), 8)}

        def get_criterion(self, stage):
            return {"ce": nn.CrossEntropyLoss()}

        def get_optimizer(self, stage, model):
            return torch.optim.SGD(model.parameters(), lr=0.1)

        def get_callbacks(self, stage):
            return {"criterion": losses()[0], "opt": dl.OptimizerCallback("loss_ce"), "w": wrapper}

    torch.manual_seed(0)
    TwoStages(model=nn.Linear(4, 3), engine=dl.DeviceEngine("cpu")).run()
    # global epoch 3 is epoch 1 of stage "two"
    assert _loader_passes(inner.events) == [(1, "train", 5)]


def test_control_flow_wrapped_accuracy_only_on_its_loaders():
    wrapped = dl.ControlFlowCallback(dl.AccuracyCallback("logits", "targets"), loaders="valid")
    runner = train([*losses(), wrapped, dl.OptimizerCallback("loss_ce")])
    assert "accuracy01" not in runner.epoch_metrics["train"]
    reference = train(
        [*losses(), dl.AccuracyCallback("logits", "targets"), dl.OptimizerCallback("loss_ce")]
    )
    assert (
        runner.epoch_metrics["valid"]["accuracy01"]
        == reference.epoch_metrics["valid"]["accuracy01"]
    )


def test_control_flow_pickles_its_filters():
    for filter_fn in (lambda s, e, loader: e == 2, "lambda s, e, l: e == 2"):
        wrapper = pickle.loads(pickle.dumps(dl.ControlFlowCallback(_Events(), filter_fn=filter_fn)))
        assert wrapper.passes("train", 2, "x") and not wrapper.passes("train", 1, "x")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {},
            ValueError,
            "needs one of epochs, ignore_epochs, loaders, ignore_loaders or filter_fn",
        ),
        ({"epochs": 0}, ValueError, "epochs must be a whole number >= 1, got 0"),
        ({"ignore_epochs": [1, 2.5]}, ValueError, "ignore_epochs entries must be a whole number"),
        ({"loaders": 5}, ValueError, "loaders must be a loader key"),
        ({"ignore_loaders": {"valid": "x"}}, ValueError, r"ignore_loaders\['valid'\]"),
        ({"filter_fn": lambda stage, epoch: True}, ValueError, "three arguments"),
        ({"filter_fn": "lambda s, e, l: "}, ValueError, "not valid Python"),
        ({"filter_fn": "42"}, ValueError, "not callable"),
    ],
)
def test_control_flow_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        dl.ControlFlowCallback(_Events(), **kwargs)


def test_control_flow_needs_a_callback():
    with pytest.raises(TypeError, match="base_callback must be a ddprun Callback, got Linear"):
        dl.ControlFlowCallback(nn.Linear(1, 1), epochs=1)


# --------------------------------------------------------------------- CheckRun
def test_check_run_limits_batches_and_epochs():
    passes = Passes()
    runner = train(
        [*losses(), dl.CheckRunCallback(2, 3), passes, dl.OptimizerCallback("loss_ce")],
        num_epochs=10,
    )
    assert passes.ran() == [(e, k, 16) for e in (1, 2, 3) for k in ("train", "valid")]
    assert runner.global_epoch_step == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_batch_steps": 0}, "num_batch_steps must be a whole number >= 1, got 0"),
        ({"num_epoch_steps": 1.5}, "num_epoch_steps must be a whole number >= 1, got 1.5"),
    ],
)
def test_check_run_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dl.CheckRunCallback(**kwargs)


# -------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The script in one process (batch 16) and under ``python -m ddprun --nproc 2`` (8)."""
    folder = tmp_path_factory.mktemp("control")
    argv = [str(SCRIPTS / "control_callbacks.py"), "--out"]
    single = run([sys.executable, *argv, str(folder / "one"), "--batch-size", "16"], folder)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = [sys.executable, "-m", "ddprun", "--nproc", "2", *argv, str(folder / "two")]
    multi = run([*launched, "--batch-size", "8"], folder, timeout=200)
    assert multi.returncode == 0, (multi.stdout + multi.stderr)[-3000:]
    return folder


def _result(folder):
    return json.loads((folder / "result.json").read_text())


def _assert_same_run(one, two, loaders):
    for loader in loaders:
        a, b = one["epoch_metrics"][loader], two["epoch_metrics"][loader]
        assert a.keys() == b.keys(), loader
        for key, value in a.items():
            assert b[key] == pytest.approx(value, abs=1e-6), f"{loader}/{key}"
    for name, weight in one["weights"].items():
        assert torch.allclose(torch.tensor(two["weights"][name]), torch.tensor(weight), atol=1e-5)


def test_two_ranks_aggregate_two_criteria_like_one_process(one_and_two):
    one, two = _result(one_and_two / "one"), _result(one_and_two / "two")
    assert two["world_size"] == 2
    _assert_same_run(one["aggregate"], two["aggregate"], ("train", "valid"))
    for values in two["aggregate"]["epoch_metrics"].values():
        assert values["loss"] == pytest.approx(0.7 * values["loss_ce"] + 0.3 * values["loss_bce"])
        assert values["score"] == pytest.approx(values["accuracy01"] - 0.5 * values["loss_ce"])


def test_two_ranks_control_flow_accuracy_like_one_process(one_and_two):
    one, two = _result(one_and_two / "one"), _result(one_and_two / "two")
    _assert_same_run(one["control_flow"], two["control_flow"], ("train", "valid"))
    metrics = two["control_flow"]["epoch_metrics"]  # the last epoch: 2
    assert "accuracy01" not in metrics["train"] and "accuracy02" in metrics["train"]
    assert {"accuracy01", "accuracy02"} <= set(metrics["valid"])


def test_two_ranks_periodic_checkpoint_and_equal_batch_counts(one_and_two):
    one, two = _result(one_and_two / "one"), _result(one_and_two / "two")
    _assert_same_run(one["periodic"], two["periodic"], ("train",))
    assert two["periodic"]["epoch_metrics"]["valid"] == {"loss": math.inf}  # epoch 3 skipped it
    book = json.loads((one_and_two / "two" / "logs" / "checkpoints" / "_metrics.json").read_text())
    assert book["best"]["epoch"] == 2 and book["last"]["epoch"] == 3
    ranks = [
        json.loads((one_and_two / "two" / f"batches_rank{r}.json").read_text()) for r in (0, 1)
    ]

    def per_epoch(epochs, train, valid):
        return {f"{e}/{k}": n for e in epochs for k, n in (("train", train), ("valid", valid))}

    for case, expected in [
        ("periodic", {"1/train": 32, "2/train": 32, "2/valid": 25, "3/train": 32}),
        ("check_run", per_epoch((1, 2), 16, 20)),  # 2 batches of 8 and of 10, 2 epochs
        ("overfit", per_epoch((1, 2, 3), 16, 10)),  # 2 batches of 8; half of 3 batches: 1
    ]:
        for rank in ranks:
            assert {key: len(ids) for key, ids in rank[case].items()} == expected, case
    overfit = [rank["overfit"] for rank in ranks]
    for rank in overfit:  # the same batches every epoch, each rank its own shard
        assert rank["1/train"] == rank["2/train"] == rank["3/train"]
    assert not set(overfit[0]["1/train"]) & set(overfit[1]["1/train"])
    # 2 ranks x 2 batches of 8 are one process's 2 batches of 16: the same training
    _assert_same_run(one["overfit"], two["overfit"], ("train",))
    _assert_same_run(one["check_run"], two["check_run"], ("train",))


def test_spawn_mode_sends_lambdas_to_the_workers(tmp_path):
    """Catalyst 21.12's issue #1317: callbacks holding lambdas could not be pickled for spawn."""
    done = run(
        [sys.executable, str(SCRIPTS / "control_spawn.py"), "--out", str(tmp_path)], tmp_path
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = json.loads((tmp_path / "result.json").read_text())
    for values in metrics.values():
        assert values["loss"] == pytest.approx(2 * values["ce"])
    assert "accuracy01" in metrics["valid"] and "accuracy01" not in metrics["train"]


def test_unwrap_callback_sees_through_nested_wrappers():
    criterion = dl.CriterionCallback("logits", "targets")
    wrapped = dl.ControlFlowCallback(dl.ControlFlowCallback(criterion, epochs=2), loaders="train")
    assert unwrap_callback(wrapped) is criterion and unwrap_callback(criterion) is criterion
