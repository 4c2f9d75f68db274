"""SchedulerCallback and EarlyStoppingCallback (API.md section 5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ddprun import dl, utils
from tests.runner.helpers import (
    Recorder,
    ScriptedMetricRunner,
    SupervisedRunner,
    engine,
    linear,
    loaders,
)


def epoch_snapshot(event: str, runner: Any) -> Any:
    if event == "on_epoch_end":
        return {k: dict(v) for k, v in runner.epoch_metrics.items()}
    if event == "on_batch_end":
        return (runner.loader_key, runner.batch_metrics.get("lr"))
    return None


def train(runner, model, optimizer, scheduler, callback, epochs, log=None, **kwargs) -> None:
    callbacks = {
        "criterion": dl.CriterionCallback("logits", "targets"),
        "optimizer": dl.OptimizerCallback(),
        "scheduler": callback,
    }
    if log is not None:
        callbacks["rec"] = Recorder(
            log, order=dl.CallbackOrder.ExternalExtra, snapshot=epoch_snapshot
        )
    runner.train(
        model=model,
        loaders=loaders(),
        criterion=nn.MSELoss(),
        optimizer=optimizer,
        scheduler=scheduler,
        callbacks=callbacks,
        engine=engine(),
        loggers=kwargs.pop("loggers", {}),
        num_epochs=epochs,
        **kwargs,
    )


def test_epoch_mode_step_lr_reports_lr_per_epoch_and_per_train_loader():
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    log: list = []
    train(SupervisedRunner(), model, optimizer, scheduler, dl.SchedulerCallback(), 3, log)
    epochs = [snap for _, event, snap in log if event == "on_epoch_end"]
    assert [e["_epoch_"]["lr"] for e in epochs] == pytest.approx([0.05, 0.025, 0.0125])
    assert [e["train"]["lr"] for e in epochs] == pytest.approx([0.1, 0.05, 0.025])
    assert all("lr" not in e["valid"] for e in epochs)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)
    # epoch mode never steps per batch
    assert all(snap[1] is None for _, event, snap in log if event == "on_batch_end")


def test_epoch_lr_reaches_the_loggers():
    class Memory(dl.ILogger):
        def __init__(self) -> None:
            self.epochs: list[dict] = []

        def log_metrics(self, metrics: Any, scope: str, runner: Any) -> None:
            if scope == "epoch":
                self.epochs.append({k: dict(v) for k, v in metrics.items()})

    memory = Memory()
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(
        SupervisedRunner(),
        model,
        optimizer,
        scheduler,
        dl.SchedulerCallback(),
        2,
        loggers={"memory": memory},
    )
    assert [e["_epoch_"]["lr"] for e in memory.epochs] == pytest.approx([0.05, 0.025])


def test_batch_mode_steps_per_train_batch():
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    log: list = []
    train(
        SupervisedRunner(), model, optimizer, scheduler, dl.SchedulerCallback(mode="batch"), 2, log
    )
    # 3 train batches per epoch, 2 epochs; valid batches do not step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**6)
    batch_lrs = [snap for _, event, snap in log if event == "on_batch_end"]
    train_lrs = [lr for key, lr in batch_lrs if key == "train"]
    assert train_lrs == pytest.approx([0.1 * 0.9**i for i in range(1, 7)])
    assert all(lr is None for key, lr in batch_lrs if key == "valid")
    epochs = [snap for _, event, snap in log if event == "on_epoch_end"]
    assert "_epoch_" not in epochs[0]
    assert epochs[1]["train"]["lr"] == pytest.approx(0.1 * 0.9**6)


def plateau_lrs(scores: list[float], patience: int = 1) -> list[float]:
    optimizer = torch.optim.SGD(linear().parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=patience)
    lrs = []
    for score in scores:
        scheduler.step(score)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize(
    "scores", [[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.25, 0.125, 0.1], [1.0, 0.9, 0.95, 0.97, 0.5]]
)
def test_reduce_on_plateau_follows_the_named_loader_metric(scores):
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    log: list = []
    callback = dl.SchedulerCallback(loader_key="valid", metric_key="score")
    train(ScriptedMetricRunner(scores), model, optimizer, scheduler, callback, len(scores), log)
    epochs = [snap for _, event, snap in log if event == "on_epoch_end"]
    assert [e["_epoch_"]["lr"] for e in epochs] == pytest.approx(plateau_lrs(scores))


def test_reduce_on_plateau_reduces_when_the_metric_stalls():
    assert plateau_lrs([1.0] * 5)[-1] < 0.1  # the reference itself reduces
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    callback = dl.SchedulerCallback(loader_key="valid", metric_key="score")
    train(ScriptedMetricRunner([1.0] * 5), model, optimizer, scheduler, callback, 5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize(
    "kwargs", [{}, {"mode": "batch", "loader_key": "valid", "metric_key": "loss"}]
)
def test_reduce_on_plateau_without_keys_is_a_clear_value_error(kwargs):
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match="ReduceLROnPlateau.*loader_key"):
        train(SupervisedRunner(), model, optimizer, scheduler, dl.SchedulerCallback(**kwargs), 1)


def test_scheduler_callback_keys_come_in_pairs():
    with pytest.raises(ValueError, match="loader_key and metric_key"):
        dl.SchedulerCallback(loader_key="valid")
    with pytest.raises(ValueError, match="mode"):
        dl.SchedulerCallback(mode="step")


def test_dict_schedulers_with_scheduler_key():
    model = {"a": linear(0), "b": linear(1)}
    optimizer = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in model.items()}
    scheduler = {
        k: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for k, o in optimizer.items()
    }

    class Runner(dl.Runner):
        def handle_batch(self, batch: Any) -> None:
            features, targets = batch
            logits = self.model["a"](features) + self.model["b"](features)
            self.batch = {"logits": logits, "targets": targets}

    log: list = []
    train(Runner(), model, optimizer, scheduler, dl.SchedulerCallback(scheduler_key="a"), 2, log)
    assert optimizer["a"].param_groups[0]["lr"] == pytest.approx(0.025)
    assert optimizer["b"].param_groups[0]["lr"] == pytest.approx(0.1)
    epochs = [snap for _, event, snap in log if event == "on_epoch_end"]
    assert epochs[-1]["_epoch_"] == pytest.approx({"lr/a": 0.025})
    assert epochs[-1]["train"]["lr/a"] == pytest.approx(0.05)

    optimizer = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in model.items()}
    scheduler = {
        k: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for k, o in optimizer.items()
    }
    log = []
    train(Runner(), model, optimizer, scheduler, dl.SchedulerCallback(), 1, log)
    epochs = [snap for _, event, snap in log if event == "on_epoch_end"]
    assert epochs[-1]["_epoch_"] == pytest.approx({"lr/a": 0.05, "lr/b": 0.05})


# -------------------------------------------------------------- early stopping
def early_stop_run(scores, patience, minimize=True, epochs=10, **kwargs) -> tuple[Any, list]:
    log: list = []
    model = linear()
    runner = ScriptedMetricRunner(scores + [0.0] * (epochs - len(scores)))
    runner.train(
        model=model,
        loaders=loaders(),
        criterion=nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        callbacks={
            "criterion": dl.CriterionCallback("logits", "targets"),
            "optimizer": dl.OptimizerCallback(),
            "early": dl.EarlyStoppingCallback(
                patience=patience, loader_key="valid", metric_key="score", minimize=minimize
            ),
            "rec": Recorder(log),
        },
        engine=engine(),
        loggers={},
        num_epochs=epochs,
        **kwargs,
    )
    return runner, [event for _, event, _ in log]


@pytest.mark.parametrize(
    ("scores", "patience", "minimize", "epochs_run"),
    [
        ([1.0, 0.5, 0.6, 0.7, 0.4], 2, True, 4),
        ([1.0, 0.5, 0.6, 0.4, 0.45, 0.5, 0.55], 3, True, 7),
        ([1.0, 1.0, 1.0], 1, True, 2),
        ([0.1, 0.2, 0.3, 0.3, 0.29, 0.9], 2, False, 5),
        # improvements below min_delta (1e-6) do not count
        ([1.0, 1.0 - 1e-8, 1.0 - 2e-8], 2, True, 3),
    ],
)
def test_early_stopping_after_patience_epochs_without_improvement(
    scores, patience, minimize, epochs_run
):
    runner, events = early_stop_run(scores, patience, minimize)
    assert events.count("on_epoch_end") == epochs_run
    assert runner.global_epoch_step == epochs_run
    assert events.count("on_stage_end") == 1 and events[-1] == "on_experiment_end"


def test_without_stall_all_epochs_run():
    runner, events = early_stop_run([5.0, 4.0, 3.0, 2.0, 1.0], 1, epochs=5)
    assert events.count("on_epoch_end") == 5


def test_the_stopping_epoch_is_still_checkpointed(tmp_path):
    early_stop_run([1.0, 0.5, 0.6, 0.7, 0.4], 2, logdir=tmp_path, valid_metric="score")
    last = utils.load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    best = utils.load_checkpoint(tmp_path / "checkpoints" / "best.pth")
    assert last["global_epoch_step"] == 4 and best["global_epoch_step"] == 2


def test_early_stop_ends_only_its_stage():
    class TwoStages(ScriptedMetricRunner):
        @property
        def stages(self) -> list[str]:
            return ["first", "second"]

        def get_stage_len(self, stage: str) -> int:
            return 5

        def get_callbacks(self, stage: str) -> dict:
            callbacks = {
                "rec": Recorder(self.log, snapshot=lambda e, r: r.stage_key),
            }
            if stage == "first":
                callbacks["early"] = dl.EarlyStoppingCallback(
                    patience=1, loader_key="valid", metric_key="score", minimize=True
                )
            return callbacks

    runner = TwoStages({"first": [1.0, 1.0, 1.0, 1.0, 1.0], "second": [1.0] * 5})
    runner.log = []
    runner.train(model=linear(), loaders=loaders(), engine=engine(), loggers={})
    ends = [stage for _, event, stage in runner.log if event == "on_epoch_end"]
    assert ends == ["first"] * 2 + ["second"] * 5


def test_early_stopping_rejects_bad_patience():
    with pytest.raises(ValueError, match="patience"):
        dl.EarlyStoppingCallback(patience=0, loader_key="valid", metric_key="loss", minimize=True)
