"""Catalyst 21.12's runner surface (issue 12, items 1, 2 and 8): SupervisedRunner, the runner
as a callback, train(loaders=None), apex; the README patterns equal across ranks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl
from tests.workloads.helpers import run

SCRIPTS = __import__("pathlib").Path(__file__).parent / "scripts"
pytestmark = pytest.mark.timeout(240)


def _data(n=64, features=6, classes=3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, features, generator=generator)
    return TensorDataset(x, x[:, :classes].argmax(dim=1))


def test_readme_patterns_on_two_ranks_equal_one_process(tmp_path):
    import sys

    argv = [sys.executable, str(SCRIPTS / "supervised_and_meters.py")]
    single, multi = tmp_path / "single", tmp_path / "multi"
    done = run([*argv, "--out", str(single)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    launched = [sys.executable, "-m", "ddprun", "--nproc", "2", *argv[1:]]
    done = run([*launched, "--out", str(multi), "--batch-size", "16"], cwd=tmp_path, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    one = json.loads((single / "result.json").read_text())
    two = json.loads((multi / "result.json").read_text())
    assert (one["engine"], two["engine"]) == ("DeviceEngine", "DistributedDataParallelEngine")
    for run_name in ("supervised", "custom"):
        for loader, values in one[run_name].items():
            assert values.keys() == two[run_name][loader].keys()
            for key, value in values.items():
                assert two[run_name][loader][key] == pytest.approx(value, abs=1e-6), key
    # the docs' meters (updated with .item() in handle_batch, kept by the runner) are exact
    for loader in ("train", "valid"):
        custom = two["custom"][loader]
        assert custom["meter/loss"] == pytest.approx(custom["loss"], abs=1e-9)
        assert custom["meter/accuracy01"] == pytest.approx(custom["accuracy01"], abs=1e-9)
    assert one["evaluated"] == pytest.approx(two["evaluated"])
    assert torch.allclose(
        torch.tensor(one["predictions"]), torch.tensor(two["predictions"]), atol=1e-5
    )
    # SupervisedRunner added the criterion, optimizer and checkpoint callbacks: it learned
    assert one["supervised"]["valid"]["accuracy01"] > 0.5
    assert (single / "logs" / "checkpoints" / "best.pth").is_file()


class _Recorder(dl.Callback):
    def __init__(self, log):
        super().__init__(order=dl.CallbackOrder.Metric)
        self.log = log

    def on_loader_start(self, runner):
        self.log.append("callback:loader_start")

    def on_loader_end(self, runner):
        self.log.append("callback:loader_end")

    def on_epoch_end(self, runner):
        self.log.append("callback:epoch_end")


class _HookedRunner(dl.SupervisedRunner):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def on_experiment_start(self, runner):
        self.log.append(f"runner:experiment_start:{runner.stage_key}")

    def on_loader_start(self, runner):
        super().on_loader_start(runner)
        self.log.append(f"runner:loader_start:{runner.loader_key}:{runner.loader_batch_len}")

    def on_batch_end(self, runner):
        if runner.loader_batch_step == 1:
            self.log.append(f"runner:batch_end:{sorted(runner.batch)}")

    def on_loader_end(self, runner):
        self.log.append(f"runner:loader_end:{'loss' in runner.loader_metrics}")
        runner.loader_metrics["mine"] = 7.0
        super().on_loader_end(runner)

    def on_epoch_end(self, runner):
        self.log.append(f"runner:epoch_end:{runner.epoch_metrics['valid']['mine']}")

    def on_stage_end(self, runner):
        self.log.append("runner:stage_end")

    def on_experiment_end(self, runner):
        self.log.append("runner:experiment_end")


def test_the_runners_own_hooks_run_in_catalyst_order():
    log: list[str] = []
    model = nn.Linear(6, 3)
    runner = _HookedRunner(log)
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders={"train": DataLoader(_data(), batch_size=16), "valid": DataLoader(_data(), 32)},
        callbacks=[_Recorder(log)],
        loggers={},
    )
    assert log == [
        "runner:experiment_start:train",
        "runner:loader_start:train:4",
        "callback:loader_start",
        "runner:batch_end:['features', 'logits', 'targets']",
        "callback:loader_end",
        "runner:loader_end:True",  # after the averaged loss is in, as in Catalyst
        "runner:loader_start:valid:2",
        "callback:loader_start",
        "runner:batch_end:['features', 'logits', 'targets']",
        "callback:loader_end",
        "runner:loader_end:True",
        "callback:epoch_end",
        "runner:epoch_end:7.0",
        "runner:stage_end",
        "runner:experiment_end",
    ]
    assert runner.epoch_metrics["valid"]["mine"] == 7.0 and "loss" in runner.epoch_metrics["valid"]


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(2, 3)

    def forward(self, features, extra):
        return self.a(features) + self.b(extra), self.a(features)


def test_several_input_and_output_keys_and_dict_batches():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            x = torch.randn(6)
            return {"features": x, "extra": x[:2], "targets": int(x[:3].argmax())}

    model = _TwoHeads()
    runner = dl.SupervisedRunner(input_key=["features", "extra"], output_key=["logits", "aux"])
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders={"train": DataLoader(Pairs(), batch_size=8)},
        loggers={},
    )
    assert "loss" in runner.epoch_metrics["train"]
    out = runner.predict_batch({"features": torch.randn(2, 6), "extra": torch.randn(2, 2)})
    assert set(out) == {"logits", "aux"} and out["logits"].shape == (2, 3)


def test_model_returning_the_wrong_number_of_outputs_is_named():
    runner = dl.SupervisedRunner(input_key=["features", "extra"], output_key=["a", "b", "c"])
    runner.model = _TwoHeads()
    batch = {"features": torch.randn(2, 6), "extra": torch.randn(2, 2)}
    with pytest.raises(
        dl.RunnerError, match=r"names 3 outputs, but the model returned a tuple of 2"
    ):
        runner.forward(batch)
    with pytest.raises(KeyError, match=r"the batch has no 'extra'"):
        runner.forward({"features": torch.randn(2, 6)})


def test_train_without_loaders_uses_a_get_loaders_override():
    class OwnLoaders(dl.SupervisedRunner):
        def get_loaders(self, stage):
            return {"train": DataLoader(_data(), batch_size=16)}

    model = nn.Linear(6, 3)
    runner = OwnLoaders()
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loggers={},
        num_epochs=2,
    )
    assert runner.global_batch_step == 8
    with pytest.raises(dl.RunnerError, match="needs loaders=..., or a get_loaders"):
        dl.SupervisedRunner().train(model=nn.Linear(6, 3), loggers={})


def test_apex_runs_native_amp_with_one_warning():
    model = nn.Linear(6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = dl.SupervisedRunner()
        runner.train(
            model=model,
            criterion=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loaders={"train": DataLoader(_data(), batch_size=16)},
            loggers={},
            apex=True,
        )
    apex = [w for w in caught if "apex" in str(w.message).lower()]
    assert len(apex) == 1 and "native AMP" in str(apex[0].message)
    assert isinstance(runner.engine, dl.AMPEngine)


def _supervised_train(runner, **options):
    model = nn.Linear(6, 3)
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders={"train": DataLoader(_data(), batch_size=8), "valid": DataLoader(_data(), 8)},
        loggers={},
        **options,
    )
    return runner


def test_check_and_overfit_flags_add_their_callbacks():
    checked = _supervised_train(dl.SupervisedRunner(), num_epochs=5, check=True)
    assert checked.global_epoch_step == 3  # 3 epochs, 3 train batches each
    assert checked.global_batch_step == 9
    overfit = _supervised_train(dl.SupervisedRunner(), num_epochs=2, overfit=True)
    assert overfit.global_batch_step == 2  # one batch per loader and epoch
    assert isinstance(overfit._callbacks["_overfit"], dl.BatchOverfitCallback)


def test_a_wrapped_criterion_callback_counts_as_given():
    wrapped = dl.ControlFlowCallback(
        dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
        ignore_loaders="valid",
    )
    runner = _supervised_train(dl.SupervisedRunner(), callbacks=[wrapped])
    kinds = [type(cb).__name__ for cb in runner._callbacks.values()]
    assert kinds.count("CriterionCallback") == 0 and "ControlFlowCallback" in kinds
    assert "loss" in runner.epoch_metrics["train"] and "loss" not in runner.epoch_metrics["valid"]
