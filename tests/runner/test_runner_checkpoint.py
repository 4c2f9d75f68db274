"""CheckpointCallback and checkpoint I/O through the runner (API.md section 7)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ddprun.checkpoint
from ddprun import dl, utils
from ddprun.checkpoint import CheckpointError
from tests.runner.helpers import (
    Recorder,
    SupervisedRunner,
    assert_same_state,
    engine,
    linear,
    loader,
    loaders,
    state_of,
    supervised_callbacks,
)

CHECKPOINT_KEYS = {
    "model_state_dict",
    "criterion_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "scaler_state_dict",
    "stage_key",
    "stage_epoch_step",
    "global_epoch_step",
    "global_batch_step",
    "global_sample_step",
    "metrics",
    "rng",
    "ddprun_version",
}


class StagedRunner(dl.IRunner):
    """Stages and lengths from `stages`; valid ``score`` scripted per stage and epoch.

    Callbacks: criterion + optimizer + ``make_callbacks(stage)``. The model is kept across
    stages (get_model returns self.model once there is one) unless `fresh_model` is set.
    """

    def __init__(
        self,
        stages: dict[str, int],
        scores: dict[str, list[float]] | None = None,
        make_callbacks: Callable[[str], dict] = lambda stage: {},
        make_model: Callable[[], Any] = linear,
        fresh_model: bool = False,
        fail_at: tuple | None = None,
    ) -> None:
        super().__init__()
        self._stages, self.scores = stages, scores or {}
        self.make_callbacks, self.make_model = make_callbacks, make_model
        self.fresh_model, self.fail_at = fresh_model, fail_at

    @property
    def stages(self) -> list[str]:
        return list(self._stages)

    def get_stage_len(self, stage: str) -> int:
        return self._stages[stage]

    def get_engine(self) -> Any:
        return engine()

    def get_loggers(self) -> dict:
        return {}

    def get_loaders(self, stage: str) -> dict:
        return loaders()

    def get_model(self, stage: str) -> Any:
        if self.model is None or self.fresh_model:
            return self.make_model()
        return self.model

    def get_criterion(self, stage: str) -> Any:
        return nn.MSELoss()

    def get_optimizer(self, stage: str, model: Any) -> Any:
        return torch.optim.Adam(model.parameters(), lr=0.01)

    def get_callbacks(self, stage: str) -> dict:
        return {**supervised_callbacks(), **self.make_callbacks(stage)}

    def handle_batch(self, batch: Any) -> None:
        position = (self.stage_key, self.stage_epoch_step, self.loader_key, self.loader_batch_step)
        if position == self.fail_at:
            raise RuntimeError(f"crash at {position}")
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}
        scores = self.scores.get(self.stage_key)
        if scores:
            self.batch_metrics["score"] = float(scores[self.stage_epoch_step - 1])


def checkpointer(logdir: Path, **kwargs: Any) -> dl.CheckpointCallback:
    kwargs.setdefault("loader_key", "valid")
    kwargs.setdefault("metric_key", "score")
    return dl.CheckpointCallback(logdir=logdir, **kwargs)


def epoch_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.pth") if p.name not in ("best.pth", "last.pth"))


# ------------------------------------------------------------------------- saving
def test_best_last_and_metrics_json(tmp_path):
    scores = [0.5, 0.2, 0.9]
    StagedRunner(
        {"train": 3}, {"train": scores}, lambda s: {"ckpt": checkpointer(tmp_path, save_n_best=2)}
    ).run()
    folder = tmp_path / "checkpoints"
    best = utils.load_checkpoint(folder / "best.pth")
    last = utils.load_checkpoint(folder / "last.pth")
    assert CHECKPOINT_KEYS <= set(best) and CHECKPOINT_KEYS <= set(last)
    assert (best["stage_key"], best["stage_epoch_step"], best["global_epoch_step"]) == (
        "train",
        2,
        2,
    )
    assert (last["global_epoch_step"], last["global_batch_step"], last["global_sample_step"]) == (
        3,
        9,
        120,
    )
    assert best["metrics"]["valid"]["score"] == pytest.approx(0.2)
    assert isinstance(best["rng"], dict) and best["scaler_state_dict"] is None
    assert set(best["model_state_dict"]) == {"weight", "bias"}
    assert epoch_files(folder) == ["train.1.pth", "train.2.pth"]

    data = json.loads((folder / "_metrics.json").read_text())
    records = data["checkpoints"]
    assert sorted(r["file"] for r in records) == ["train.1.pth", "train.2.pth"]
    for record in records + [data["best"], data["last"]]:
        assert type(record["score"]) in (int, float)
    assert data["best"]["score"] == pytest.approx(0.2)
    assert {r["file"]: r["score"] for r in records} == pytest.approx(
        {"train.1.pth": 0.5, "train.2.pth": 0.2}
    )


def test_save_n_best_keeps_exactly_n_and_never_deletes_by_prefix(tmp_path):
    """Epoch 1 is among the best until epochs 10, 11, 12 beat it; deleting train.1.pth must not
    take train.10/11/12.pth with it (the prefix-glob bug)."""
    scores = [0.4, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 0.3, 0.2, 0.1, 2.0]
    seen: list[list[str]] = []
    folder = tmp_path / "checkpoints"

    def snapshot(event: str, runner: Any) -> None:
        if event == "on_epoch_end":
            seen.append(epoch_files(folder))

    StagedRunner(
        {"train": 13},
        {"train": scores},
        lambda s: {
            "ckpt": checkpointer(tmp_path, save_n_best=3),
            "rec": Recorder([], order=dl.CallbackOrder.ExternalExtra, snapshot=snapshot),
        },
    ).run()
    assert seen[8] == ["train.1.pth", "train.2.pth", "train.3.pth"]
    assert seen[9] == ["train.1.pth", "train.10.pth", "train.2.pth"]
    assert seen[10] == ["train.1.pth", "train.10.pth", "train.11.pth"]
    assert seen[11] == ["train.10.pth", "train.11.pth", "train.12.pth"]
    assert epoch_files(folder) == ["train.10.pth", "train.11.pth", "train.12.pth"]
    assert all(len(files) == min(i + 1, 3) for i, files in enumerate(seen))
    assert utils.load_checkpoint(folder / "best.pth")["global_epoch_step"] == 12
    assert utils.load_checkpoint(folder / "train.11.pth")["stage_epoch_step"] == 11


def test_save_n_best_is_per_stage(tmp_path):
    scores = {"one": [0.5, 0.3, 0.4], "two": [0.9, 0.8, 0.95]}
    StagedRunner(
        {"one": 3, "two": 3}, scores, lambda s: {"ckpt": checkpointer(tmp_path, save_n_best=1)}
    ).run()
    folder = tmp_path / "checkpoints"
    assert epoch_files(folder) == ["one.2.pth", "two.2.pth"]
    # best.pth is the best over the whole run
    assert utils.load_checkpoint(folder / "best.pth")["stage_key"] == "one"
    assert utils.load_checkpoint(folder / "last.pth")["global_epoch_step"] == 6


def test_maximize_and_no_metric(tmp_path):
    StagedRunner(
        {"train": 3},
        {"train": [0.5, 0.9, 0.7]},
        lambda s: {"ckpt": checkpointer(tmp_path / "max", minimize=False, save_n_best=1)},
    ).run()
    assert epoch_files(tmp_path / "max" / "checkpoints") == ["train.2.pth"]
    # without a metric the newest epoch is the best
    StagedRunner(
        {"train": 3}, {}, lambda s: {"ckpt": dl.CheckpointCallback(tmp_path / "new")}
    ).run()
    folder = tmp_path / "new" / "checkpoints"
    assert utils.load_checkpoint(folder / "best.pth")["global_epoch_step"] == 3
    assert epoch_files(folder) == ["train.3.pth"]


# ------------------------------------------------------------------------ loading
def test_load_on_stage_start_best_loads_stage_one_best_weights(tmp_path):
    folder = tmp_path / "checkpoints"
    at_stage_start: dict[str, Any] = {}

    def snapshot(event: str, runner: Any) -> None:
        if event == "on_stage_start":
            at_stage_start[runner.stage_key] = state_of(runner.model)

    def make(stage: str) -> dict:
        return {
            "ckpt": checkpointer(tmp_path, save_n_best=3, load_on_stage_start="best"),
            "rec": Recorder([], order=dl.CallbackOrder.ExternalExtra, snapshot=snapshot),
        }

    runner = StagedRunner(
        {"one": 3, "two": 2}, {"one": [0.5, 0.1, 0.9], "two": [0.7, 0.8]}, make, fresh_model=True
    )
    runner.run()
    stage_one_best = utils.load_checkpoint(folder / "one.2.pth")["model_state_dict"]
    assert_same_state(at_stage_start["two"], stage_one_best)
    stage_one_last = utils.load_checkpoint(folder / "one.3.pth")["model_state_dict"]
    assert not torch.equal(at_stage_start["two"]["weight"], stage_one_last["weight"])


def test_first_stage_of_a_fresh_run_skips_loading_with_one_log_line(tmp_path, capsys):
    def make(stage: str) -> dict:
        return {"ckpt": checkpointer(tmp_path, load_on_stage_start="best")}

    StagedRunner({"one": 1, "two": 1}, {"one": [1.0], "two": [1.0]}, make).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if "load_on_stage_start" in line]
    assert len(lines) == 1
    assert "skipped" in lines[0]


def test_dict_load_spec_with_counters(tmp_path):
    at_stage_start: dict[str, Any] = {}

    def snapshot(event: str, runner: Any) -> None:
        if event == "on_stage_start":
            at_stage_start[runner.stage_key] = {
                "global_epoch_step": runner.global_epoch_step,
                "global_batch_step": runner.global_batch_step,
                "global_sample_step": runner.global_sample_step,
                "model": state_of(runner.model),
                "optimizer_steps": [
                    float(s["step"]) for s in runner.optimizer.state_dict()["state"].values()
                ],
            }

    spec = {
        "model": "best",
        "optimizer": "best",
        "global_epoch_step": "best",
        "global_batch_step": "last",
    }

    def make(stage: str) -> dict:
        extra = {"load_on_stage_start": spec} if stage == "two" else {}
        return {
            "ckpt": checkpointer(tmp_path, save_n_best=3, **extra),
            "rec": Recorder([], order=dl.CallbackOrder.ExternalExtra, snapshot=snapshot),
        }

    runner = StagedRunner({"one": 3, "two": 1}, {"one": [0.5, 0.1, 0.9], "two": [1.0]}, make)
    runner.run()
    start = at_stage_start["two"]
    assert start["global_epoch_step"] == 2  # from best (epoch 2)
    assert start["global_batch_step"] == 9  # from last (epoch 3)
    assert start["global_sample_step"] == 120  # not in the spec: kept
    best = utils.load_checkpoint(tmp_path / "checkpoints" / "one.2.pth")
    assert_same_state(start["model"], best["model_state_dict"])
    assert start["optimizer_steps"] == [6.0, 6.0]  # Adam steps at the end of epoch 2
    assert runner.global_epoch_step == 3


def test_load_in_a_later_stage_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"

    def make(stage: str) -> dict:
        extra = {"load_on_stage_start": str(missing)} if stage == "two" else {}
        return {"ckpt": checkpointer(tmp_path, **extra)}

    with pytest.raises(FileNotFoundError, match=str(missing)):
        StagedRunner({"one": 1, "two": 1}, {"one": [1.0], "two": [1.0]}, make).run()


@pytest.mark.parametrize("where", ["load_on_stage_start", "load_on_stage_end"])
def test_unknown_load_target_is_a_value_error_naming_it(tmp_path, where):
    with pytest.raises(ValueError, match="modle"):
        dl.CheckpointCallback(logdir=tmp_path, **{where: {"modle": "best", "optimizer": "last"}})


def test_load_on_stage_end_best(tmp_path):
    def make(stage: str) -> dict:
        return {"ckpt": checkpointer(tmp_path, save_n_best=3, load_on_stage_end="best")}

    runner = StagedRunner({"one": 3}, {"one": [0.5, 0.1, 0.9]}, make)
    runner.run()
    best = utils.load_checkpoint(tmp_path / "checkpoints" / "one.2.pth")
    assert_same_state(state_of(runner.model), best["model_state_dict"])


# ----------------------------------------------------------------------- resuming
def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))


def train_run(num_epochs: int, **kwargs: Any) -> tuple[nn.Module, Any, list]:
    model = dropout_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    log: list = []
    runner = SupervisedRunner()
    runner.train(
        model=model,
        loaders={"train": loader(40, 16, shuffle=True), "valid": loader(24, 16, seed=1)},
        criterion=nn.MSELoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7),
        callbacks={
            **supervised_callbacks(),
            "scheduler": dl.SchedulerCallback(),
            "rec": Recorder(log),
        },
        engine=engine(),
        loggers={},
        num_epochs=num_epochs,
        **kwargs,
    )
    return model, runner, [event for _, event, _ in log]


@pytest.mark.parametrize("with_logdir", [True, False])
def test_resume_continues_bit_identically(tmp_path, with_logdir):
    straight, straight_runner, _ = train_run(3)
    train_run(2, logdir=tmp_path / "first")
    path = tmp_path / "first" / "checkpoints" / "last.pth"
    extra = {"logdir": tmp_path / "second"} if with_logdir else {}
    resumed, runner, events = train_run(3, resume=str(path), **extra)
    assert events.count("on_epoch_end") == 1
    assert_same_state(state_of(straight), state_of(resumed))
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.7**3)
    counters = ("global_epoch_step", "global_batch_step", "global_sample_step", "stage_epoch_step")
    assert [getattr(runner, c) for c in counters] == [3, 9, 120, 3]
    assert runner.epoch_metrics == straight_runner.epoch_metrics


def test_resume_auto(tmp_path):
    straight, _, _ = train_run(3)
    _, _, events = train_run(2, logdir=tmp_path, resume="auto")  # nothing to resume yet
    assert events.count("on_epoch_end") == 2
    resumed, _, events = train_run(3, logdir=tmp_path, resume="auto")
    assert events.count("on_epoch_end") == 1
    assert_same_state(state_of(straight), state_of(resumed))
    folder = tmp_path / "checkpoints"
    assert len(epoch_files(folder)) == 1  # save_n_best=1 carried over from the first run
    data = json.loads((folder / "_metrics.json").read_text())
    assert data["last"]["global_epoch"] == 3
    assert [r["file"] for r in data["checkpoints"]] == epoch_files(folder)


def test_metrics_json_is_strict_json_when_the_metric_is_nan(tmp_path):
    StagedRunner(
        {"train": 2},
        {"train": [float("nan"), 0.5]},
        lambda s: {"ckpt": checkpointer(tmp_path, save_n_best=2)},
    ).run()
    text = (tmp_path / "checkpoints" / "_metrics.json").read_text()

    def reject(constant: str) -> None:
        raise ValueError(f"not a JSON number: {constant}")

    json.loads(text, parse_constant=reject)


def test_resume_from_a_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        train_run(1, resume=str(tmp_path / "nope.pth"))


def test_resume_a_multi_stage_run_in_its_second_stage(tmp_path):
    stages = {"one": 2, "two": 2}
    scores = {"one": [1.0, 0.9], "two": [0.8, 0.7]}

    def make_with(resume: str | None, log: list) -> Callable[[str], dict]:
        return lambda stage: {
            "ckpt": checkpointer(tmp_path / "run", resume=resume),
            "rec": Recorder(log, snapshot=lambda e, r: (r.stage_key, r.stage_epoch_step)),
        }

    straight = StagedRunner(stages, scores, make_with(None, []))
    straight.run()
    shutil_rmtree(tmp_path / "run")
    crashed = StagedRunner(stages, scores, make_with(None, []), fail_at=("two", 2, "train", 1))
    with pytest.raises(RuntimeError, match="crash"):
        crashed.run()
    last = tmp_path / "run" / "checkpoints" / "last.pth"
    assert utils.load_checkpoint(last)["global_epoch_step"] == 3
    log: list = []
    resumed = StagedRunner(stages, scores, make_with(str(last), log))
    resumed.run()
    epochs = [where for _, event, where in log if event == "on_epoch_end"]
    assert epochs == [("two", 2)]
    assert resumed.global_epoch_step == 4
    assert_same_state(state_of(straight.model), state_of(resumed.model))


def test_resume_mid_epoch_continues_at_the_next_batch(tmp_path):
    log: list = []

    def make_with(resume: str | None, log: list) -> Callable[[str], dict]:
        return lambda stage: {
            "ckpt": checkpointer(tmp_path, resume=resume, save_every_n_batches=1),
            "rec": Recorder(
                log,
                snapshot=lambda e, r: (
                    r.stage_epoch_step,
                    r.loader_key,
                    getattr(r, "loader_batch_step", None),
                ),
            ),
        }

    straight = StagedRunner({"train": 2}, {"train": [1.0, 1.0]}, make_with(None, []))
    straight.run()
    shutil_rmtree(tmp_path / "checkpoints")
    crashed = StagedRunner(
        {"train": 2}, {"train": [1.0, 1.0]}, make_with(None, []), fail_at=("train", 2, "train", 3)
    )
    with pytest.raises(RuntimeError, match="crash"):
        crashed.run()
    resumed = StagedRunner(
        {"train": 2},
        {"train": [1.0, 1.0]},
        make_with(str(tmp_path / "checkpoints" / "last.pth"), log),
    )
    resumed.run()
    batches = [where for _, event, where in log if event == "on_batch_start"]
    assert batches[0] == (2, "train", 3)
    assert resumed.global_batch_step == 6
    assert_same_state(state_of(straight.model), state_of(resumed.model))


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


# ------------------------------------------------------------------- bad files
def test_checkpoint_of_another_architecture_names_file_and_component(tmp_path):
    path = tmp_path / "wide.pth"
    utils.save_checkpoint(utils.pack_checkpoint(model=nn.Linear(4, 3)), path)
    with pytest.raises(CheckpointError) as info:
        train_run(1, resume=str(path))
    message = str(info.value)
    assert str(path) in message and "model" in message

    def make(stage: str) -> dict:
        spec = str(path) if stage == "two" else None
        return {"ckpt": dl.CheckpointCallback(logdir=tmp_path / "run", load_on_stage_start=spec)}

    with pytest.raises(CheckpointError, match="wide.pth.*model"):
        StagedRunner({"one": 1, "two": 1}, {}, make).run()


def test_first_stage_loads_an_explicit_existing_path(tmp_path):
    pretrained = linear(seed=99)
    path = tmp_path / "pretrained.pth"
    utils.save_checkpoint(utils.pack_checkpoint(model=pretrained), path)
    at_start: list = []

    def make(stage: str) -> dict:
        return {
            "ckpt": dl.CheckpointCallback(logdir=tmp_path / "run", load_on_stage_start=str(path)),
            "rec": Recorder(
                [],
                order=dl.CallbackOrder.ExternalExtra,
                snapshot=lambda e, r: (
                    at_start.append(state_of(r.model)) if e == "on_stage_start" else None
                ),
            ),
        }

    StagedRunner({"one": 1}, {}, make).run()
    assert_same_state(at_start[0], state_of(pretrained))


def test_truncated_checkpoint_names_the_file(tmp_path):
    good = tmp_path / "good.pth"
    utils.save_checkpoint(utils.pack_checkpoint(model=linear()), good)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="bad.pth"):
        utils.load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="bad.pth"):
        train_run(1, resume=str(bad))
    with pytest.raises(CheckpointError, match="bad.pth"):
        list(SupervisedRunner().predict_loader(loader=loader(), model=linear(), resume=str(bad)))


def test_crash_during_save_keeps_old_files_and_leaves_no_temp_file(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= 1:  # epoch 1: one write (last.pth; best.pth, train.1.pth linked)
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ddprun.checkpoint.torch, "save", flaky_save)
    runner = StagedRunner(
        {"train": 2},
        {"train": [1.0, 0.5]},
        lambda s: {"ckpt": checkpointer(tmp_path, save_n_best=2)},
    )
    with pytest.raises(OSError, match="disk full"):
        runner.run()
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["_metrics.json", "best.pth", "last.pth", "train.1.pth"]
    for name in ("best.pth", "last.pth"):
        assert utils.load_checkpoint(folder / name)["global_epoch_step"] == 1


def test_save_checkpoint_is_atomic_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    utils.save_checkpoint({"v": 1}, path)

    def failing(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(ddprun.checkpoint.torch, "save", failing)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint({"v": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["x.pth"]
    assert utils.load_checkpoint(path) == {"v": 1}


# ------------------------------------------------------------------ dict models
class TwoPartRunner(SupervisedRunner):
    def handle_batch(self, batch: Any) -> None:
        features, targets = batch
        logits = self.model["head"](self.model["encoder"](features))
        self.batch = {"features": features, "targets": targets, "logits": logits}

    def predict_batch(self, batch: Any, **kwargs: Any) -> torch.Tensor:
        return self.model["head"](self.model["encoder"](batch[0]))


def two_part(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"encoder": nn.Linear(4, 3), "head": nn.Linear(3, 1)}


def test_dict_models_save_and_load_key_by_key(tmp_path):
    model = two_part(0)
    optimizer = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in model.items()}
    TwoPartRunner().train(
        model=model,
        loaders=loaders(),
        criterion=nn.MSELoss(),
        optimizer=optimizer,
        callbacks=supervised_callbacks(),
        engine=engine(),
        loggers={},
        logdir=tmp_path,
        num_epochs=2,
    )
    last = utils.load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert set(last["model_state_dict"]) == {"encoder", "head"}
    assert set(last["optimizer_state_dict"]) == {"encoder", "head"}
    for key in model:
        assert_same_state(last["model_state_dict"][key], state_of(model[key]))

    fresh = two_part(1)
    outputs = list(
        TwoPartRunner().predict_loader(
            loader=loader(8, 8),
            model=fresh,
            engine=engine(),
            resume=str(tmp_path / "checkpoints" / "last.pth"),
        )
    )
    features = loader(8, 8).dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(outputs[0], model["head"](model["encoder"](features)))
    for key in model:
        assert_same_state(state_of(fresh[key]), state_of(model[key]))

    missing_key = {"encoder": nn.Linear(4, 3), "decoder": nn.Linear(3, 1)}
    with pytest.raises(CheckpointError, match="decoder|'head'"):
        utils.unpack_checkpoint(last, model=missing_key)
