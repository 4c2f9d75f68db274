"""Counters, loader kinds, train/eval modes and batch_metrics averaging (API.md section 2)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddprun import dl
from tests.runner.helpers import Recorder, SupervisedRunner, engine, linear, loader

COUNTERS = (
    "stage_key",
    "global_epoch_step",
    "stage_epoch_step",
    "loader_key",
    "global_batch_step",
    "global_sample_step",
    "loader_batch_step",
    "loader_sample_step",
    "loader_batch_len",
    "loader_batch_size",
    "batch_size",
)


class CountingRunner(dl.IRunner):
    """Stages s1, s2 with 2 epochs each; train: 40 samples, valid: 24 samples, batch 16."""

    def __init__(self, callbacks: dict) -> None:
        super().__init__()
        self._cbs = callbacks

    @property
    def stages(self) -> list[str]:
        return ["s1", "s2"]

    def get_stage_len(self, stage: str) -> int:
        return 2

    def get_engine(self) -> Any:
        return engine()

    def get_loggers(self) -> dict:
        return {}

    def get_loaders(self, stage: str) -> dict:
        return {"train": loader(40, 16), "valid": loader(24, 16, seed=1)}

    def get_model(self, stage: str) -> Any:
        return linear()

    def get_callbacks(self, stage: str) -> dict:
        return self._cbs

    def handle_batch(self, batch: Any) -> None:
        self.batch = {"logits": self.model(batch[0]), "targets": batch[1]}


def snapshot(event: str, runner: Any) -> dict:
    # loader counters exist before the first loader too (see the test below)
    return {name: getattr(runner, name, None) for name in COUNTERS}


STATE_TABLE = (
    "engine device model criterion optimizer scheduler loaders callbacks loggers stage_key "
    "stage_epoch_len stage_epoch_step global_epoch_step global_batch_step global_sample_step "
    "loader_key loader_batch_step loader_sample_step loader_batch_len loader_batch_size "
    "is_train_loader is_valid_loader is_infer_loader batch batch_metrics loader_metrics "
    "epoch_metrics need_early_stop need_exception_reraise"
).split()


def test_every_state_attribute_is_readable_at_stage_start():
    missing: list = []

    def probe(event: str, runner: Any) -> None:
        if event == "on_stage_start" and runner.stage_key == "s1":
            missing.extend(name for name in STATE_TABLE if not hasattr(runner, name))

    CountingRunner({"rec": Recorder([], snapshot=probe)}).run()
    assert missing == []


def test_counters_across_two_stages():
    log: list = []
    runner = CountingRunner({"rec": Recorder(log, snapshot=snapshot)})
    runner.run()
    batches = [state for _, event, state in log if event == "on_batch_start"]
    assert len(batches) == 2 * 2 * (3 + 2)

    expected = []
    global_epoch = global_batch = global_sample = 0
    for stage in ("s1", "s2"):
        for epoch in (1, 2):
            global_epoch += 1
            for key, sizes in (("train", [16, 16, 8]), ("valid", [16, 8])):
                loader_samples = 0
                for step, size in enumerate(sizes, start=1):
                    loader_samples += size
                    if key == "train":
                        global_batch += 1
                        global_sample += size
                    expected.append(
                        {
                            "stage_key": stage,
                            "global_epoch_step": global_epoch,
                            "stage_epoch_step": epoch,
                            "loader_key": key,
                            "global_batch_step": global_batch,
                            "global_sample_step": global_sample,
                            "loader_batch_step": step,
                            "loader_sample_step": loader_samples,
                            "loader_batch_len": len(sizes),
                            "loader_batch_size": 16,
                            "batch_size": size,
                        }
                    )
    assert batches == expected
    assert (runner.global_epoch_step, runner.global_batch_step, runner.global_sample_step) == (
        4,
        12,
        160,
    )


def test_stage_counters_restart_and_global_counters_continue_at_stage_start():
    log: list = []
    CountingRunner({"rec": Recorder(log, snapshot=snapshot)}).run()
    starts = [state for _, event, state in log if event == "on_stage_start"]
    assert [(s["stage_key"], s["stage_epoch_step"], s["global_epoch_step"]) for s in starts] == [
        ("s1", 0, 0),
        ("s2", 0, 2),
    ]
    assert [s["global_batch_step"] for s in starts] == [0, 6]
    assert [s["global_sample_step"] for s in starts] == [0, 80]


class ModeRunner(SupervisedRunner):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple] = {}

    def handle_batch(self, batch: Any) -> None:
        super().handle_batch(batch)
        self.seen[self.loader_key] = (
            self.is_train_loader,
            self.is_valid_loader,
            self.is_infer_loader,
            self.model.training,
            torch.is_grad_enabled(),
            self.batch["logits"].requires_grad,
        )


def test_loader_kind_by_key_prefix_and_model_mode():
    runner = ModeRunner()
    keys = ["train", "train_extra", "valid", "test", "infer", "infer_holdout"]
    runner.train(
        model=linear(),
        loaders={key: loader(8, 4) for key in keys},
        engine=engine(),
        loggers={},
    )
    train = (True, False, False, True, True, True)
    evaluate = (False, True, False, False, False, False)
    infer = (False, False, True, False, False, False)
    assert runner.seen == {
        "train": train,
        "train_extra": train,
        "valid": evaluate,
        "test": evaluate,
        "infer": infer,
        "infer_holdout": infer,
    }


class LoggingRunner(SupervisedRunner):
    """Logs a float and a tensor per batch, and the loss computed by hand."""

    def handle_batch(self, batch: Any) -> None:
        super().handle_batch(batch)
        self.batch_metrics["as_float"] = float(self.loader_batch_step)
        self.batch_metrics["as_tensor"] = torch.tensor(2.0 * self.loader_batch_step)
        self.batch_metrics["as_int"] = self.loader_batch_step * 10


def test_user_batch_metrics_are_averaged_weighted_by_batch_size():
    runner = LoggingRunner()
    model = linear()
    runner.train(
        model=model,
        loaders={"valid": loader(40, 16)},
        criterion=torch.nn.MSELoss(),
        callbacks={"criterion": dl.CriterionCallback("logits", "targets")},
        engine=engine(),
        loggers={},
    )
    metrics = runner.epoch_metrics["valid"]
    # batches of 16, 16, 8 with values 1, 2, 3
    assert metrics["as_float"] == pytest.approx((16 * 1 + 16 * 2 + 8 * 3) / 40, abs=1e-12)
    assert metrics["as_tensor"] == pytest.approx(2 * 72 / 40, abs=1e-6)
    assert metrics["as_int"] == pytest.approx(720 / 40, abs=1e-9)
    # a mean-reduced loss weighted by batch size is the loss over the whole loader
    features, targets = loader(40, 40).dataset.tensors
    with torch.no_grad():
        full = torch.nn.functional.mse_loss(model(features), targets).item()
    assert metrics["loss"] == pytest.approx(full, rel=1e-5)
    assert runner.loader_metrics == metrics
    for value in metrics.values():
        assert type(value) is float


def test_epoch_metrics_hold_floats_per_loader():
    runner = LoggingRunner()
    model = linear()
    runner.train(
        model=model,
        loaders={"train": loader(40, 16), "valid": loader(24, 16, seed=1)},
        criterion=torch.nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        callbacks={
            "criterion": dl.CriterionCallback("logits", "targets"),
            "optimizer": dl.OptimizerCallback(),
        },
        engine=engine(),
        loggers={},
    )
    assert set(runner.epoch_metrics) == {"train", "valid"}
    assert set(runner.epoch_metrics["valid"]) == {"loss", "as_float", "as_tensor", "as_int"}
    for values in runner.epoch_metrics.values():
        assert all(type(v) is float for v in values.values())
    assert runner.epoch_metrics["valid"]["as_float"] == pytest.approx((16 + 16) / 24)
