"""Runner.train / predict_loader / evaluate_loader and bad input (API.md sections 3, 5, 7)."""

from __future__ import annotations

import csv
import inspect
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from ddprun import dl, utils
from ddprun.core.runner import RunnerError
from tests.runner.helpers import (
    Recorder,
    ScriptedMetricRunner,
    SupervisedRunner,
    assert_same_state,
    engine,
    linear,
    loader,
    loaders,
    state_of,
    supervised_callbacks,
)

SPEC_TRAIN_DEFAULTS = {
    "model": inspect.Parameter.empty,
    # None: a get_loaders(stage) override gives them (Catalyst 21.12, issue 12)
    "loaders": None,
    "criterion": None,
    "optimizer": None,
    "scheduler": None,
    "engine": None,
    "callbacks": None,
    "loggers": None,
    "seed": 42,
    "hparams": None,
    "num_epochs": 1,
    "logdir": None,
    "valid_loader": "valid",
    "valid_metric": "loss",
    "minimize_valid_metric": True,
    "verbose": False,
    "timeit": False,
    "load_best_on_end": False,
    "resume": None,
    "amp": False,
    "ddp": False,
    # the sharded engine (issue 14): FSDPEngine, bf16/fp16 parameters with amp
    "fsdp": False,
    # Catalyst 21.12's flags (issue 12): fp16/apex run native AMP, check/overfit add callbacks
    "fp16": False,
    "apex": False,
    "check": False,
    "overfit": False,
    "trial": None,
}


class MemoryLogger(dl.ILogger):
    def __init__(self) -> None:
        self.hparams: list[dict] = []
        self.records: list[tuple[str, dict]] = []
        self.closed = 0

    def log_hparams(self, hparams: Any, runner: Any) -> None:
        self.hparams.append(dict(hparams))

    def log_metrics(self, metrics: Any, scope: str, runner: Any) -> None:
        self.records.append((scope, dict(metrics)))

    def close_log(self) -> None:
        self.closed += 1


def fit(runner: dl.Runner, model=None, **kwargs: Any) -> torch.nn.Module:
    model = model if model is not None else linear()
    kwargs.setdefault("loaders", loaders())
    kwargs.setdefault("criterion", torch.nn.MSELoss())
    kwargs.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=0.05))
    kwargs.setdefault("callbacks", supervised_callbacks())
    kwargs.setdefault("engine", engine())
    kwargs.setdefault("loggers", {})
    runner.train(model=model, **kwargs)
    return model


# ------------------------------------------------------------------------ train()
def test_train_signature_is_the_contract():
    signature = inspect.signature(dl.Runner.train)
    params = {n: p for n, p in signature.parameters.items() if n != "self"}
    assert {n: p.default for n, p in params.items()} == SPEC_TRAIN_DEFAULTS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_train_with_every_parameter(tmp_path, capsys):
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    memory = MemoryLogger()
    the_engine = engine()
    runner = SupervisedRunner()
    runner.train(
        model=model,
        loaders=loaders(),
        criterion=torch.nn.MSELoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
        engine=the_engine,
        callbacks={**supervised_callbacks(), "scheduler": dl.SchedulerCallback()},
        loggers={"memory": memory},
        seed=7,
        hparams={"lr": 0.05, "note": "x"},
        num_epochs=2,
        logdir=tmp_path / "run",
        valid_loader="valid",
        valid_metric="loss",
        minimize_valid_metric=True,
        verbose=True,
        timeit=True,
        load_best_on_end=True,
        resume=None,
        amp=False,
        ddp=False,
    )
    assert runner.engine is the_engine
    assert runner.global_epoch_step == 2
    assert memory.hparams == [{"lr": 0.05, "note": "x"}]
    assert memory.closed >= 1
    scopes = [scope for scope, _ in memory.records]
    assert scopes.count("epoch") == 2 and scopes.count("loader") == 4
    kinds = {type(cb) for cb in runner.callbacks.values()}
    assert {dl.TqdmCallback, dl.TimerCallback, dl.CheckpointCallback} <= kinds
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    assert (tmp_path / "run" / "checkpoints" / "best.pth").is_file()
    assert "Epoch (train)" in capsys.readouterr().err


def test_amp_flag_picks_amp_engine():
    runner = SupervisedRunner()
    fit(runner, engine=None, amp=True)
    assert isinstance(runner.engine, dl.AMPEngine)
    runner = SupervisedRunner()
    fit(runner, engine=None)
    assert type(runner.engine) is dl.DeviceEngine


class LegacyRunner(dl.Runner):
    def _handle_batch(self, batch: Any) -> None:
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}


def test_handle_batch_and_legacy__handle_batch_train_the_same():
    new = fit(SupervisedRunner(), num_epochs=2)
    legacy_runner = LegacyRunner()
    legacy = fit(legacy_runner, num_epochs=2)
    assert_same_state(state_of(new), state_of(legacy))
    assert legacy_runner.epoch_metrics["valid"]["loss"] > 0


def test_runner_without_handle_batch_says_so():
    with pytest.raises(NotImplementedError, match="handle_batch"):
        fit(dl.Runner())


class ManualRunner(dl.Runner):
    """Backward and step by hand inside handle_batch (allowed by the contract)."""

    def handle_batch(self, batch: Any) -> None:
        features, targets = batch
        loss = torch.nn.functional.mse_loss(self.model(features), targets)
        if self.is_train_loader:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.batch_metrics["loss"] = loss


def test_backward_and_step_by_hand_in_handle_batch():
    model = linear()
    before = state_of(model)
    runner = ManualRunner()
    fit(runner, model=model, callbacks=None, num_epochs=3)
    assert not torch.equal(before["weight"], model.weight.detach())
    reference = linear()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(3):
        for features, targets in loader(40, 16):
            torch.nn.functional.mse_loss(reference(features), targets).backward()
            opt.step()
            opt.zero_grad()
    assert_same_state(state_of(reference), state_of(model))


def test_logdir_adds_csv_tensorboard_and_checkpoint(tmp_path):
    logdir = tmp_path / "logs_run"
    runner = SupervisedRunner()
    fit(runner, loggers=None, logdir=logdir, num_epochs=3)
    kinds = [type(lg) for lg in runner.loggers.values()]
    assert dl.CSVLogger in kinds and dl.TensorboardLogger in kinds and dl.ConsoleLogger in kinds
    checkpoints = [cb for cb in runner.callbacks.values() if isinstance(cb, dl.CheckpointCallback)]
    assert len(checkpoints) == 1
    assert (checkpoints[0].loader_key, checkpoints[0].metric_key) == ("valid", "loss")
    for name in ("best.pth", "last.pth", "_metrics.json"):
        assert (logdir / "checkpoints" / name).is_file(), name
    for key in ("train", "valid"):
        with open(logdir / "logs" / f"{key}.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert [row["step"] for row in rows] == ["1", "2", "3"]
        assert float(rows[-1]["loss"]) == pytest.approx(runner.epoch_metrics[key]["loss"], rel=1e-4)
        events = list((logdir / "tensorboard" / key).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0


def test_logdir_keeps_the_users_own_loggers_and_checkpoint(tmp_path):
    memory = MemoryLogger()
    own = dl.CheckpointCallback(logdir=tmp_path / "own", loader_key="valid", metric_key="loss")
    runner = SupervisedRunner()
    fit(
        runner,
        loggers={"memory": memory},
        logdir=tmp_path / "run",
        callbacks={**supervised_callbacks(), "ckpt": own},
    )
    assert "memory" in runner.loggers
    checkpoints = [cb for cb in runner.callbacks.values() if isinstance(cb, dl.CheckpointCallback)]
    assert checkpoints == [own]
    assert (tmp_path / "own" / "checkpoints" / "last.pth").is_file()


def test_verbose_adds_a_progress_bar(capsys):
    runner = SupervisedRunner()
    fit(runner, verbose=True)
    assert any(isinstance(cb, dl.TqdmCallback) for cb in runner.callbacks.values())
    err = capsys.readouterr().err
    assert "Epoch (train)" in err and "Epoch (valid)" in err
    runner = SupervisedRunner()
    fit(runner)
    assert not any(isinstance(cb, dl.TqdmCallback) for cb in runner.callbacks.values())


def test_timeit_adds_timer_keys_to_batch_metrics():
    log: list = []
    recorder = Recorder(
        log,
        order=dl.CallbackOrder.ExternalExtra,
        snapshot=lambda event, runner: (
            dict(runner.batch_metrics) if event == "on_batch_end" else None
        ),
    )
    runner = SupervisedRunner()
    fit(runner, timeit=True, callbacks={**supervised_callbacks(), "rec": recorder})
    assert any(isinstance(cb, dl.TimerCallback) for cb in runner.callbacks.values())
    batch_metrics = [snap for _, event, snap in log if event == "on_batch_end"]
    assert len(batch_metrics) == 5
    keys = {"_timer/batch_time", "_timer/data_time", "_timer/_fps"}
    for metrics in batch_metrics:
        assert keys <= set(metrics)
        assert metrics["_timer/batch_time"] > 0 and metrics["_timer/_fps"] > 0
        assert metrics["_timer/data_time"] >= 0
    assert keys <= set(runner.epoch_metrics["train"])


def test_load_best_on_end_loads_best_weights(tmp_path):
    logdir = tmp_path / "best_run"
    runner = ScriptedMetricRunner(scores=[0.9, 0.1, 0.5, 0.7])
    model = fit(
        runner,
        num_epochs=4,
        logdir=logdir,
        valid_metric="score",
        load_best_on_end=True,
    )
    best = utils.load_checkpoint(logdir / "checkpoints" / "best.pth")
    last = utils.load_checkpoint(logdir / "checkpoints" / "last.pth")
    assert best["global_epoch_step"] == 2 and last["global_epoch_step"] == 4
    assert_same_state(state_of(model), best["model_state_dict"])
    assert not torch.equal(model.weight.detach(), last["model_state_dict"]["weight"])


def test_without_load_best_on_end_the_last_weights_stay(tmp_path):
    logdir = tmp_path / "last_run"
    model = fit(
        ScriptedMetricRunner(scores=[0.9, 0.1, 0.5]),
        num_epochs=3,
        logdir=logdir,
        valid_metric="score",
    )
    last = utils.load_checkpoint(logdir / "checkpoints" / "last.pth")
    assert_same_state(state_of(model), last["model_state_dict"])


def test_minimize_valid_metric_false_picks_the_highest(tmp_path):
    logdir = tmp_path / "max_run"
    fit(
        ScriptedMetricRunner(scores=[0.2, 0.9, 0.5]),
        num_epochs=3,
        logdir=logdir,
        valid_metric="score",
        minimize_valid_metric=False,
    )
    assert utils.load_checkpoint(logdir / "checkpoints" / "best.pth")["global_epoch_step"] == 2


def test_seed_makes_runs_reproducible_and_differs_between_seeds():
    class NoisyRunner(SupervisedRunner):
        def handle_batch(self, batch: Any) -> None:
            super().handle_batch(batch)
            self.batch_metrics["noise"] = float(torch.rand(()))

    def run(seed: int) -> dict:
        runner = NoisyRunner()
        fit(runner, seed=seed, num_epochs=2, loaders={"train": loader(40, 16, shuffle=True)})
        return runner.epoch_metrics["train"]

    assert run(3) == run(3)
    assert run(3)["noise"] != run(4)["noise"]


# ------------------------------------------------------------------- inference
def test_predict_loader_is_an_eval_mode_no_grad_generator():
    model = linear()
    modes: list = []

    class Probe(SupervisedRunner):
        def predict_batch(self, batch: Any, **kwargs: Any) -> torch.Tensor:
            modes.append((self.model.training, torch.is_grad_enabled()))
            return super().predict_batch(batch)

    runner = Probe()
    data = loader(40, 16)
    outputs = runner.predict_loader(loader=data, model=model, engine=engine())
    assert inspect.isgenerator(outputs)
    outputs = list(outputs)
    assert [o.shape[0] for o in outputs] == [16, 16, 8]
    assert modes == [(False, False)] * 3
    assert not any(o.requires_grad for o in outputs)
    with torch.no_grad():
        expected = model(data.dataset.tensors[0])
    assert torch.allclose(torch.cat(outputs), expected)


def test_predict_loader_after_train_uses_the_trained_model():
    runner = SupervisedRunner()
    model = fit(runner, num_epochs=2)
    data = loader(24, 8, seed=5)
    outputs = torch.cat(list(runner.predict_loader(loader=data)))
    with torch.no_grad():
        assert torch.allclose(outputs, model(data.dataset.tensors[0]))


def test_predict_loader_does_not_disable_grad_in_the_caller():
    runner = SupervisedRunner()
    outputs = runner.predict_loader(loader=loader(40, 16), model=linear(), engine=engine())
    next(outputs)
    grad_between_items = torch.is_grad_enabled()
    outputs.close()
    assert grad_between_items


def test_predict_loader_resume_loads_the_checkpoint_weights(tmp_path):
    trained = linear(seed=123)
    path = tmp_path / "weights.pth"
    utils.save_checkpoint(utils.pack_checkpoint(model=trained), path)
    runner = SupervisedRunner()
    data = loader(24, 8)
    model = linear(seed=0)
    outputs = torch.cat(
        list(runner.predict_loader(loader=data, model=model, engine=engine(), resume=str(path)))
    )
    with torch.no_grad():
        assert torch.allclose(outputs, trained(data.dataset.tensors[0]))
    assert_same_state(state_of(model), state_of(trained))


class MetricRunner(SupervisedRunner):
    def handle_batch(self, batch: Any) -> None:
        super().handle_batch(batch)
        self.batch_metrics["step"] = float(self.loader_batch_step)


def test_evaluate_loader_without_callbacks_returns_batch_metric_averages():
    runner = MetricRunner()
    fit(runner)
    the_engine = runner.engine
    metrics = runner.evaluate_loader(loader(40, 16, seed=3))
    assert metrics["step"] == pytest.approx((16 + 32 + 24) / 40)
    assert runner.engine is the_engine
    assert all(type(v) is float for v in metrics.values())


def test_evaluate_loader_uses_the_runners_engine_and_criterion():
    criterion = torch.nn.L1Loss()
    seen: list = []

    class Spy(dl.Callback):
        def __init__(self) -> None:
            super().__init__(order=dl.CallbackOrder.External)

        def on_batch_end(self, runner: Any) -> None:
            if runner.loader_batch_step == 1:
                seen.append(
                    (
                        runner.criterion,
                        runner.engine,
                        runner.is_train_loader,
                        torch.is_grad_enabled(),
                    )
                )

    runner = SupervisedRunner()
    model = fit(runner, criterion=criterion)
    the_engine = runner.engine
    data = loader(40, 16, seed=3)
    metrics = runner.evaluate_loader(
        data, callbacks={"loss": dl.CriterionCallback("logits", "targets"), "spy": Spy()}
    )
    assert seen == [(criterion, the_engine, False, False)]
    features, targets = data.dataset.tensors
    with torch.no_grad():
        expected = torch.nn.functional.l1_loss(model(features), targets).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_loader_does_not_change_weights():
    runner = SupervisedRunner()
    model = fit(runner)
    before = state_of(model)
    runner.evaluate_loader(loader(40, 16), callbacks=[dl.CriterionCallback("logits", "targets")])
    assert_same_state(before, state_of(model))


# ------------------------------------------------------------------- bad input
def test_criterion_callback_missing_key_names_it_and_the_keys_present():
    callbacks = {"criterion": dl.CriterionCallback(input_key="predictions", target_key="targets")}
    with pytest.raises(KeyError) as info:
        fit(SupervisedRunner(), callbacks=callbacks)
    message = str(info.value)
    assert "'predictions'" in message
    assert "features" in message and "logits" in message and "targets" in message


def test_loader_with_zero_batches_is_an_error_naming_it():
    empty = DataLoader(loader(10, 16).dataset, batch_size=16, drop_last=True)
    assert len(empty) == 0
    with pytest.raises(RunnerError, match="'valid_empty'"):
        fit(SupervisedRunner(), loaders={"train": loader(), "valid_empty": empty})


def test_load_best_on_end_without_logdir_is_a_clear_error():
    with pytest.raises(RunnerError, match="logdir"):
        fit(SupervisedRunner(), load_best_on_end=True)


def test_model_none_is_a_clear_error():
    runner = SupervisedRunner()
    with pytest.raises(RunnerError, match=r"get_model\('train'\) returned None"):
        runner.train(model=None, loaders=loaders(), engine=engine(), loggers={})


def test_get_model_returning_none_in_an_irunner():
    class NoModel(dl.IRunner):
        stages = ["only"]

        def get_engine(self) -> Any:
            return engine()

        def get_loggers(self) -> dict:
            return {}

        def get_loaders(self, stage: str) -> dict:
            return {"train": loader()}

        def get_model(self, stage: str) -> Any:
            return None

    with pytest.raises(RunnerError, match="get_model.*None"):
        NoModel().run()


def test_non_callback_in_train_callbacks_is_a_type_error_naming_its_key():
    with pytest.raises(TypeError, match="'not_a_callback'"):
        fit(SupervisedRunner(), callbacks={**supervised_callbacks(), "not_a_callback": object()})


def test_valid_loader_must_be_a_loader_key_with_logdir(tmp_path):
    with pytest.raises(RunnerError, match="'validation'"):
        fit(SupervisedRunner(), logdir=tmp_path, valid_loader="validation")


def test_num_epochs_below_one_is_an_error():
    with pytest.raises(RunnerError, match="num_epochs"):
        fit(SupervisedRunner(), num_epochs=0)


def test_optimizer_callback_without_loss_names_the_missing_metric():
    with pytest.raises(KeyError, match="'loss'"):
        fit(SupervisedRunner(), callbacks={"optimizer": dl.OptimizerCallback()})


def test_timer_batch_time_includes_backward_and_optimizer_step(monkeypatch):
    """A fake clock that only advances when the optimizer steps: the step must be inside
    the measured batch time."""
    import ddprun.callbacks.timer as timer_module

    clock = {"now": 0.0}
    monkeypatch.setattr(
        timer_module,
        "time",
        type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock["now"])}),
    )
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def advance(*args: Any) -> None:
        clock["now"] += 1.0

    optimizer.register_step_post_hook(advance)
    log: list = []
    recorder = Recorder(
        log,
        order=dl.CallbackOrder.ExternalExtra + 1,
        snapshot=lambda e, r: (
            (r.loader_key, r.batch_metrics.get("_timer/batch_time"))
            if e == "on_batch_end"
            else None
        ),
    )
    fit(
        SupervisedRunner(),
        model=model,
        optimizer=optimizer,
        timeit=True,
        callbacks={**supervised_callbacks(), "rec": recorder},
    )
    train_times = [
        t for _, e, snap in log if e == "on_batch_end" for key, t in [snap] if key == "train"
    ]
    assert len(train_times) == 3
    assert all(t >= 1.0 for t in train_times), train_times


def test_a_loader_without_length_runs():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(*loader(10, 10).dataset.tensors))

    model = linear()
    before = state_of(model)
    runner = SupervisedRunner()
    fit(runner, model=model, loaders={"train": DataLoader(Stream(), batch_size=4)})
    assert runner.global_batch_step == 3 and runner.global_sample_step == 10
    assert not torch.equal(before["weight"], model.weight)


def test_load_best_on_end_with_the_users_own_checkpoint_callback(tmp_path):
    own = dl.CheckpointCallback(logdir=tmp_path / "own", loader_key="valid", metric_key="score")
    model = fit(
        ScriptedMetricRunner(scores=[0.9, 0.1, 0.5]),
        num_epochs=3,
        logdir=tmp_path / "run",
        valid_metric="score",
        load_best_on_end=True,
        callbacks={**supervised_callbacks(), "ckpt": own},
    )
    best = utils.load_checkpoint(tmp_path / "own" / "checkpoints" / "best.pth")
    assert best["global_epoch_step"] == 2
    assert_same_state(state_of(model), best["model_state_dict"])


def test_resume_with_the_users_own_checkpoint_callback(tmp_path):
    first = fit(SupervisedRunner(), num_epochs=2, logdir=tmp_path / "first")
    path = tmp_path / "first" / "checkpoints" / "last.pth"
    own = dl.CheckpointCallback(logdir=tmp_path / "own", loader_key="valid", metric_key="loss")
    runner = SupervisedRunner()
    model = fit(
        runner,
        model=linear(seed=7),
        num_epochs=2,
        resume=str(path),
        callbacks={**supervised_callbacks(), "ckpt": own},
    )
    assert runner.global_epoch_step == 2  # nothing left to run after the restored epoch 2
    assert_same_state(state_of(model), state_of(first))
