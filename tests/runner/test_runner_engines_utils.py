"""Single-process engines (DeviceEngine, AMPEngine on CPU) and ddprun.utils (API.md 1, 4)."""

from __future__ import annotations

import random
import time
from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ddprun import dl, utils
from tests.runner.helpers import SupervisedRunner, linear, loader, supervised_callbacks


# ----------------------------------------------------------------------- engines
def test_device_engine_on_cpu():
    engine = dl.DeviceEngine("cpu")
    assert engine.device == torch.device("cpu")
    assert (engine.rank, engine.world_size, engine.is_master, engine.is_ddp) == (-1, 1, True, False)
    tensor = torch.tensor([1.0, 2.0])
    assert torch.equal(engine.all_reduce(tensor, "sum"), torch.tensor([1.0, 2.0]))
    assert [t.tolist() for t in engine.all_gather(tensor)] == [[1.0, 2.0]]
    engine.barrier()
    with engine.autocast():
        assert nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32


def test_device_engine_default_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert dl.DeviceEngine().device.type == expected


class DtypeRunner(SupervisedRunner):
    def handle_batch(self, batch: Any) -> None:
        super().handle_batch(batch)
        self.dtypes.append(
            (self.loader_key, self.batch["logits"].dtype, torch.is_autocast_enabled("cpu"))
        )


def amp_run(tmp_path=None, epochs: int = 6) -> tuple[DtypeRunner, nn.Module]:
    model = linear()
    runner = DtypeRunner()
    runner.dtypes = []
    runner.train(
        model=model,
        loaders={"train": loader(64, 16), "valid": loader(64, 16)},
        criterion=nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        callbacks=supervised_callbacks(),
        engine=dl.AMPEngine("cpu"),
        loggers={},
        num_epochs=epochs,
        logdir=tmp_path,
    )
    return runner, model


def test_amp_engine_cpu_autocasts_to_bf16_inside_handle_batch(tmp_path):
    runner, model = amp_run(tmp_path, epochs=1)
    assert runner.engine.device == torch.device("cpu")
    assert {dtype for _, dtype, _ in runner.dtypes} == {torch.bfloat16}
    assert all(enabled for _, _, enabled in runner.dtypes)
    assert {key for key, _, _ in runner.dtypes} == {"train", "valid"}
    # the parameters stay float32 and autocast is off again after the run
    assert model.weight.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    checkpoint = utils.load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert "scaler_state_dict" in checkpoint and checkpoint["scaler_state_dict"] is None


def test_amp_engine_cpu_training_reduces_the_loss():
    runner, _ = amp_run(epochs=1)
    first = runner.epoch_metrics["valid"]["loss"]
    runner, _ = amp_run(epochs=6)
    assert runner.epoch_metrics["valid"]["loss"] < 0.9 * first


def test_amp_dtype_names():
    assert dl.AMPEngine("cpu", dtype="bf16").precision.dtype == torch.bfloat16
    assert dl.AMPEngine("cpu").precision.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp8"):
        dl.AMPEngine("cpu", dtype="fp8")


def test_engine_pack_and_unpack_checkpoint_roundtrip():
    engine = dl.DeviceEngine("cpu")
    model, other = linear(0), linear(1)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    packed = engine.pack_checkpoint(model=model, optimizer=optimizer, global_epoch_step=5)
    assert packed["global_epoch_step"] == 5 and packed["scaler_state_dict"] is None
    other_optimizer = torch.optim.Adam(other.parameters())
    engine.unpack_checkpoint(packed, model=other, optimizer=other_optimizer)
    assert torch.equal(other.weight, model.weight)
    assert other_optimizer.state_dict()["state"][0]["step"] == 1


# ------------------------------------------------------------------------- utils
def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_set_requires_grad_with_bool():
    model = two_layers()
    utils.set_requires_grad(model, False)
    assert not any(flags(model).values())
    utils.set_requires_grad(model, True)
    assert all(flags(model).values())
    models = {"a": two_layers(), "b": linear()}
    utils.set_requires_grad(models, False)
    assert not any(p.requires_grad for m in models.values() for p in m.parameters())


def test_set_requires_grad_with_prefixes_longest_wins():
    model = two_layers()
    utils.set_requires_grad(model, {"0": False, "0.bias": True})
    assert flags(model) == {"0.weight": False, "0.bias": True, "1.weight": True, "1.bias": True}
    utils.set_requires_grad(model, {"1.": False, "0.weight": True})
    assert flags(model) == {"0.weight": True, "0.bias": True, "1.weight": False, "1.bias": False}


def test_set_requires_grad_unknown_prefix_is_a_value_error_and_changes_nothing():
    model = two_layers()
    with pytest.raises(ValueError, match="'2.'"):
        utils.set_requires_grad(model, {"0": False, "2.": False})
    assert all(flags(model).values())


def test_set_requires_grad_prefixes_on_a_dict_of_modules():
    models = {"a": two_layers(), "b": two_layers()}
    utils.set_requires_grad(models, {"0.": False})
    for model in models.values():
        assert flags(model) == {
            "0.weight": False,
            "0.bias": False,
            "1.weight": True,
            "1.bias": True,
        }


def test_set_global_seed_reproduces_python_numpy_and_torch():
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    utils.set_global_seed(123)
    first = draw()
    utils.set_global_seed(123)
    assert draw() == first
    utils.set_global_seed(124)
    second = draw()
    assert all(a != b for a, b in zip(first, second))


Pair = namedtuple("Pair", ["left", "right"])


def test_any2device_on_nested_containers():
    batch = {
        "x": torch.ones(2),
        "items": [torch.zeros(1), (torch.ones(3), "label", 7)],
        "pair": Pair(torch.arange(2), {"deep": torch.ones(1, 1)}),
        "name": "keep",
    }
    moved = utils.any2device(batch, "meta")
    assert moved["x"].device.type == "meta" and moved["x"].shape == (2,)
    assert isinstance(moved["items"], list) and isinstance(moved["items"][1], tuple)
    assert moved["items"][0].device.type == "meta"
    assert moved["items"][1][0].device.type == "meta"
    assert moved["items"][1][1:] == ("label", 7)
    assert type(moved["pair"]) is Pair
    assert moved["pair"].left.device.type == "meta"
    assert moved["pair"].right["deep"].device.type == "meta"
    assert moved["name"] == "keep"
    # the input is not modified
    assert batch["x"].device.type == "cpu"


def test_rank_helpers_without_distribution():
    assert utils.get_rank() == -1
    assert utils.get_world_size() == 1


def test_save_load_unpack_checkpoint(tmp_path):
    model, optimizer_model = linear(0), linear(0)
    optimizer = torch.optim.SGD(optimizer_model.parameters(), lr=0.3, momentum=0.9)
    path = utils.save_checkpoint(
        utils.pack_checkpoint(model=model, optimizer=optimizer), tmp_path / "c.pth"
    )
    checkpoint = utils.load_checkpoint(path)
    target = linear(5)
    target_optimizer = torch.optim.SGD(target.parameters(), lr=0.01)
    utils.unpack_checkpoint(checkpoint, model=target, optimizer=target_optimizer)
    assert torch.equal(target.weight, model.weight)
    assert target_optimizer.param_groups[0]["lr"] == 0.3
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        utils.load_checkpoint(tmp_path / "missing.pth")


class _AgreementLog(dl.DeviceEngine):
    """A CPU engine noting the train batch of every stop agreement and its proposal."""

    def __init__(self, runner_ref: list) -> None:
        super().__init__("cpu")
        self.runner_ref, self.calls = runner_ref, []

    def agree_to_stop(self, signum, every=1):
        self.calls.append((self.runner_ref[0].global_batch_step, every))
        return super().agree_to_stop(signum, every)


def _run_recording_agreements(runner: SupervisedRunner, batches: int) -> list:
    engine = _AgreementLog([runner])
    model = linear()
    runner.train(
        model=model,
        criterion=nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loaders={"train": loader(batches * 2, batch_size=2)},
        callbacks=supervised_callbacks(),
        engine=engine,
        loggers={},
        num_epochs=2,
        verbose=False,
    )
    return engine.calls


def test_fixed_stop_check_interval_counts_train_batches_across_epochs():
    runner = SupervisedRunner()
    runner.stop_check_every_n_batches = 3
    calls = _run_recording_agreements(runner, batches=10)  # 20 train batches over 2 epochs
    assert calls == [(3, 3), (6, 3), (9, 3), (12, 3), (15, 3), (18, 3)]


def test_stop_check_interval_follows_the_step_time():
    class SlowRunner(SupervisedRunner):
        def handle_batch(self, batch):
            time.sleep(0.01)
            super().handle_batch(batch)

    fast = SupervisedRunner()
    fast.stop_check_max_batches = 16
    fast.stop_check_seconds = 10.0  # any step under 0.6 s asks for the cap
    calls = _run_recording_agreements(fast, batches=40)
    # the first agreement after one batch proposes one more batch (measured from the loader's
    # start, one batch includes no batch_end callbacks: no backward, no step); then the cap,
    # counted across the epoch boundary
    assert calls[0] == (1, 1)
    assert {every for _, every in calls[1:]} == {16}
    assert [b for b, _ in calls] == [1, 2, 18, 34, 50, 66]

    slow = SlowRunner()
    slow.stop_check_seconds = 0.05  # 10+ ms steps: a check every 5 batches or fewer
    proposals = [every for _, every in _run_recording_agreements(slow, batches=20)]
    assert proposals and all(1 <= every <= 5 for every in proposals)
