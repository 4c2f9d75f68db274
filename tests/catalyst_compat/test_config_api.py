"""The Config API (issue 12, item 7): dl.ConfigRunner / dl.SupervisedConfigRunner built from a
dict or a YAML file, `_target_` names from ddprun.registry.REGISTRY (torch, ddprun, contrib on
demand, the user's own), multistage configs, and a config on 2 ranks equal to one process."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ddprun import dl, utils
from ddprun.registry import REGISTRY, ConfigError
from tests.workloads.helpers import run

SCRIPTS = Path(__file__).parent / "scripts"
pytestmark = pytest.mark.timeout(240)

NUM_SAMPLES, NUM_FEATURES, NUM_CLASSES = 320, 10, 4
_generator = torch.Generator().manual_seed(3)
X = torch.rand(NUM_SAMPLES, NUM_FEATURES, generator=_generator)
Y = (torch.rand(NUM_SAMPLES, generator=_generator) * NUM_CLASSES).to(torch.int64)


class CustomConfigRunner(dl.SupervisedConfigRunner):
    """The README's runner: datasets from code; keeps the model's first weights."""

    def get_datasets(self, stage: str):
        dataset = TensorDataset(X, Y)
        return {"train": dataset, "valid": dataset}

    def on_stage_start(self, runner) -> None:
        self.initial_state = copy.deepcopy(self.model.state_dict())


def _readme_config(logdir: Path) -> dict:
    """Catalyst 21.12 README's "Config API" example (2 epochs, 320 samples)."""
    return {
        "args": {
            "logdir": str(logdir),
            "valid_loader": "valid",
            "valid_metric": "accuracy01",
            "minimize_valid_metric": False,
            "verbose": False,
        },
        "model": {"_target_": "Linear", "in_features": NUM_FEATURES, "out_features": NUM_CLASSES},
        "engine": {"_target_": "DeviceEngine"},
        "loggers": {
            "console": {"_target_": "ConsoleLogger"},
            "csv": {"_target_": "CSVLogger", "logdir": str(logdir)},
            "tensorboard": {"_target_": "TensorboardLogger", "logdir": str(logdir)},
        },
        "stages": {
            "stage1": {
                "num_epochs": 2,
                "criterion": {"_target_": "CrossEntropyLoss"},
                "optimizer": {"_target_": "Adam", "lr": 1e-3},
                "scheduler": {"_target_": "MultiStepLR", "milestones": [1]},
                "loaders": {"batch_size": 32, "num_workers": 1},
                "callbacks": {
                    "accuracy": {
                        "_target_": "AccuracyCallback",
                        "input_key": "logits",
                        "target_key": "targets",
                        "num_classes": NUM_CLASSES,
                    },
                    "classification": {
                        "_target_": "PrecisionRecallF1SupportCallback",
                        "input_key": "logits",
                        "target_key": "targets",
                        "num_classes": NUM_CLASSES,
                    },
                    "criterion": {
                        "_target_": "CriterionCallback",
                        "input_key": "logits",
                        "target_key": "targets",
                        "metric_key": "loss",
                    },
                    "optimizer": {"_target_": "OptimizerCallback", "metric_key": "loss"},
                    "scheduler": {"_target_": "SchedulerCallback"},
                    "checkpointer": {
                        "_target_": "CheckpointCallback",
                        "logdir": str(logdir),
                        "loader_key": "valid",
                        "metric_key": "accuracy01",
                        "minimize": False,
                        "save_n_best": 3,
                    },
                },
            },
        },
    }


def test_readme_config_example_trains_as_supervised_runner_train(tmp_path):
    """The README example runs and builds what the same components given to
    SupervisedRunner.train build: equal metrics and weights after 2 epochs."""
    config = _readme_config(tmp_path / "logs")
    runner = CustomConfigRunner(
        input_key="features",
        output_key="logits",
        target_key="targets",
        loss_key="loss",
        config=config,
    )
    runner.run()
    assert isinstance(runner.model, nn.Linear)
    assert isinstance(runner.optimizer, torch.optim.Adam)
    assert [group["lr"] for group in runner.optimizer.param_groups] == pytest.approx([1e-4] * 2)
    checkpoints = tmp_path / "logs" / "checkpoints"
    assert {"best.pth", "last.pth", "stage1.1.pth", "stage1.2.pth"} <= {
        p.name for p in checkpoints.iterdir()
    }
    assert (tmp_path / "logs" / "logs" / "valid.csv").read_text().count("\n") == 3  # header+2

    model = nn.Linear(NUM_FEATURES, NUM_CLASSES)
    model.load_state_dict(runner.initial_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    reference = dl.SupervisedRunner()
    reference.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1]),
        loaders={
            "train": DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True),
            "valid": DataLoader(TensorDataset(X, Y), batch_size=32),
        },
        callbacks=[
            dl.AccuracyCallback(input_key="logits", target_key="targets", num_classes=4),
            dl.PrecisionRecallF1SupportCallback(
                input_key="logits", target_key="targets", num_classes=4
            ),
        ],
        loggers={},
        num_epochs=2,
    )
    for loader, metrics in reference.epoch_metrics.items():
        assert runner.epoch_metrics[loader].keys() == metrics.keys()
        for key, value in metrics.items():
            assert runner.epoch_metrics[loader][key] == pytest.approx(value, abs=1e-6), key
    for key, value in model.state_dict().items():
        torch.testing.assert_close(runner.model.state_dict()[key], value, atol=1e-6, rtol=0)


def test_yaml_config_two_stages_on_two_ranks_equal_one_process(tmp_path):
    """The YAML config (two stages, the first with a frozen layer, batch_size 16 of the whole
    world) under plain python and `ddprun --nproc 2`: 1 x batch 16 and 2 x batch 8 give the
    same epoch metrics and weights; in spawn mode too."""
    argv = [sys.executable, str(SCRIPTS / "config_api.py")]
    single, multi = tmp_path / "single", tmp_path / "multi"
    done = run([*argv, "--out", str(single), "--logdir", str(single / "logs")], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    launched = [sys.executable, "-m", "ddprun", "--nproc", "2", *argv[1:]]
    done = run([*launched, "--out", str(multi), "--logdir", str(multi / "logs")], tmp_path, 200)
    assert done.returncode == 0, done.stdout + done.stderr
    one = json.loads((single / "result.json").read_text())
    two = json.loads((multi / "result.json").read_text())

    assert (one["engine"], two["engine"]) == ("DeviceEngine", "DistributedDataParallelEngine")
    assert one["runner"] == two["runner"] == "FreezingConfigRunner"  # from the runner section
    assert one["batch_sizes"] == {"train": 16, "valid": 16}
    assert two["batch_sizes"] == {"train": 8, "valid": 8}
    assert len(one["history"]) == len(two["history"]) == 3  # 2 + 1 epochs
    for first, second in zip(one["history"], two["history"]):
        assert (first["stage"], first["epoch"]) == (second["stage"], second["epoch"])
        for loader in ("train", "valid"):
            assert first[loader].keys() == second[loader].keys()
            for key, value in first[loader].items():
                assert second[loader][key] == pytest.approx(value, abs=1e-5), (loader, key)
    for stage in ("frozen", "unfrozen"):
        for key, value in one["stages"][stage]["end"].items():
            other = torch.tensor(two["stages"][stage]["end"][key])
            torch.testing.assert_close(other, torch.tensor(value), atol=1e-5, rtol=0)

    frozen, unfrozen = one["stages"]["frozen"], one["stages"]["unfrozen"]
    # per-stage components from the YAML (1e-2 read as a float); biases without weight decay
    assert (frozen["optimizer"], frozen["lr"]) == ("Adam", [0.01, 0.01])
    assert (unfrozen["optimizer"], unfrozen["weight_decay"]) == ("SGD", [0.001, 0.0])
    assert "SchedulerCallback" in frozen["callbacks"]  # added for the stage's scheduler
    assert {"AccuracyCallback", "CriterionCallback", "OptimizerCallback"} <= set(
        unfrozen["callbacks"]
    )
    assert "SchedulerCallback" not in unfrozen["callbacks"]  # that stage has no scheduler
    # the first layer stayed frozen in "frozen" and trained in "unfrozen"; the model carried
    assert frozen["end"]["0.weight"] == frozen["start"]["0.weight"]
    assert frozen["end"]["2.weight"] != frozen["start"]["2.weight"]
    assert unfrozen["same_model_as_before"] and unfrozen["start"] == frozen["end"]
    assert unfrozen["end"]["0.weight"] != unfrozen["start"]["0.weight"]
    for logdir in (single / "logs", multi / "logs"):  # args.logdir: checkpoints per stage
        names = {p.name for p in (logdir / "checkpoints").iterdir()}
        assert {"best.pth", "last.pth", "frozen.2.pth", "unfrozen.1.pth"} <= names

    # spawn mode (args.ddp under plain python): the parent gets the trained model back
    spawned = tmp_path / "spawned"
    done = run([*argv, "--out", str(spawned), "--ddp"], cwd=tmp_path, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    three = json.loads((spawned / "result.json").read_text())
    assert three["engine"] == "DistributedDataParallelEngine" and three["history"] == []
    for key, value in one["final"].items():
        other = torch.tensor(three["final"][key])
        torch.testing.assert_close(other, torch.tensor(value), atol=1e-5, rtol=0)


class _Points(Dataset):
    def __init__(self, size: int = 48, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = self.x[:, :2].argmax(dim=1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return {"x": self.x[index], "y": self.y[index]}


REGISTRY.add(_Points, name="ConfigTestPoints")


class _StepRunner(dl.ConfigRunner):
    """A plain ConfigRunner: the user writes handle_batch."""

    def handle_batch(self, batch) -> None:
        logits = self.model(batch["x"])
        self.batch_metrics["loss"] = self.criterion(logits, batch["y"])
        self.batch = {**batch, "logits": logits}

    def on_epoch_start(self, runner) -> None:
        # after the stage-start callbacks (CheckpointCallback loads there)
        if self.stage_epoch_step == 1:
            self.seen = getattr(self, "seen", [])
            state = copy.deepcopy(self.model.state_dict())
            self.seen.append((self.stage_key, self.model, state))

    def on_stage_end(self, runner) -> None:
        self.ends = getattr(self, "ends", {})
        self.ends[self.stage_key] = copy.deepcopy(self.model.state_dict())


def test_model_across_stages_defaults_and_loader_specs(tmp_path):
    """Stage b keeps stage a's model (same object); stage c's own `model` entry builds a new
    one, into which CheckpointCallback(load_on_stage_start="last") loads b's weights.
    Top-level criterion/optimizer/loaders are the defaults of stages without their own."""
    linear = {"_target_": "Linear", "in_features": 4, "out_features": 2}
    loader = {
        "_target_": "DataLoader",
        "batch_size": 12,
        "dataset": {"_target_": "ConfigTestPoints"},
    }
    config = {
        "args": {"logdir": str(tmp_path), "valid_loader": "valid", "valid_metric": "loss"},
        "model": linear,
        "criterion": {"_target_": "CrossEntropyLoss"},
        "optimizer": {"_target_": "SGD", "lr": 0.5},
        "loaders": {"train": loader, "valid": {**loader, "batch_size": 48}},
        "callbacks": {"opt": {"_target_": "OptimizerCallback", "metric_key": "loss"}},
        "stages": {
            "a": {},
            "b": {"num_epochs": 2, "optimizer": {"_target_": "Adam", "lr": 0.1}},
            "c": {
                "model": {**linear, "bias": True},
                "callbacks": {
                    "load": {
                        "_target_": "CheckpointCallback",
                        "logdir": str(tmp_path),
                        "load_on_stage_start": "last",
                    },
                    "opt": {"_target_": "OptimizerCallback", "metric_key": "loss"},
                },
            },
        },
    }
    runner = _StepRunner(config=config)
    runner.run()
    (a, model_a, start_a), (b, model_b, start_b), (c, model_c, start_c) = runner.seen
    assert (a, b, c) == ("a", "b", "c") and runner.global_epoch_step == 4
    assert model_b is model_a and model_c is not model_b
    for key, value in runner.ends["b"].items():
        assert torch.equal(start_b[key], runner.ends["a"][key])
        assert torch.equal(start_c[key], value)  # loaded from last.pth, b's last epoch
        assert not torch.equal(runner.ends["a"][key], start_a[key])  # a trained
    assert isinstance(runner.optimizer, torch.optim.SGD)  # c: the top-level default
    fresh = _StepRunner(config=config)  # nothing carried yet: the latest model entry
    assert isinstance(fresh.get_model("b"), nn.Linear) and fresh.get_model("b") is not model_a
    assert fresh.get_model("c") is not model_c
    assert isinstance(runner.loaders["train"], DataLoader)
    assert runner.loaders["train"].batch_size == 12  # loader specs are used as they are
    assert runner.hparams["stages"]["b"]["num_epochs"] == 2


def test_yaml_and_json_files(tmp_path):
    """utils.load_config reads YAML (anchors, `1e-2` as a float) and JSON; ConfigRunner and
    SupervisedConfigRunner take a path."""
    path = SCRIPTS / "config_api.yml"
    config = utils.load_config(path)
    frozen = config["stages"]["frozen"]
    assert frozen["optimizer"]["lr"] == 0.01 and isinstance(frozen["optimizer"]["lr"], float)
    assert config["args"]["valid_metric"] == "accuracy01"  # through the anchor
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert utils.load_config(tmp_path / "config.json") == config
    runner = dl.SupervisedConfigRunner(config=str(path))
    assert runner.stages == ["frozen", "unfrozen"] and runner.seed == 7
    assert runner.get_stage_len("frozen") == 2 and runner.get_stage_len("unfrozen") == 1
    assert dl.ConfigRunner(config=tmp_path / "config.json").stages == ["frozen", "unfrozen"]
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(ConfigError, match=r"expected a \.yml, \.yaml or \.json file"):
        utils.load_config(tmp_path / "config.toml")
    with pytest.raises(FileNotFoundError, match="missing.yml"):
        dl.ConfigRunner(config=tmp_path / "missing.yml")
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="holds a list, not a mapping"):
        utils.load_config(tmp_path / "list.yml")


def test_digits_from_contrib_by_name_learns():
    """Contrib names resolve on demand: Digits with ImageToTensor, Sequential(Flatten, Linear)
    built from `_args_`, learns well above chance in 2 epochs."""
    digits = {"_target_": "Digits", "transform": {"_target_": "ImageToTensor"}}
    runner = dl.SupervisedConfigRunner(
        config={
            "model": {
                "_target_": "torch.nn.Sequential",  # a full import path works too
                "_args_": [
                    {"_target_": "Flatten"},
                    {"_target_": "Linear", "in_features": 64, "out_features": 10},
                ],
            },
            "loggers": {},
            "stages": {
                "train": {
                    "num_epochs": 2,
                    "criterion": {"_target_": "CrossEntropyLoss"},
                    "optimizer": {"_target_": "Adam", "lr": 0.02},
                    "loaders": {
                        "batch_size": 64,
                        "datasets": {"train": digits, "valid": {**digits, "train": False}},
                    },
                    "callbacks": {
                        "accuracy": {
                            "_target_": "AccuracyCallback",
                            "input_key": "logits",
                            "target_key": "targets",
                        }
                    },
                }
            },
        }
    )
    runner.run()
    assert runner.epoch_metrics["valid"]["accuracy01"] > 0.8
