"""The Config API's registry (issue 12, item 7): torch and ddprun names, contrib only on
demand, the user's own classes, and clear errors naming where in the config and what was
expected; optimizer and scheduler options of Catalyst's configs."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from ddprun import dl
from ddprun.registry import REGISTRY, ConfigError, Registry, RegistryError
from tests.workloads.helpers import run

pytestmark = pytest.mark.timeout(120)


def test_contrib_is_imported_only_when_a_name_needs_it(tmp_path):
    code = (
        "import sys\n"
        "from ddprun import dl\n"
        "from ddprun.registry import REGISTRY\n"
        "assert REGISTRY.get('Linear') is __import__('torch').nn.Linear\n"
        "assert REGISTRY.get('CheckpointCallback') is dl.CheckpointCallback\n"
        "assert not [m for m in sys.modules if m.startswith('ddprun.contrib')]\n"
        "from ddprun.contrib import MnistSimpleNet\n"
        "assert REGISTRY.get('MnistSimpleNet') is MnistSimpleNet\n"
        "print('ok')\n"
    )
    done = run([sys.executable, "-c", code], cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_user_registration():
    registry = Registry()

    @registry.add
    class MyNet(nn.Module):
        pass

    @registry.add(name="Other")
    class _Hidden(nn.Module):
        pass

    def make_blocks(n: int) -> nn.Sequential:
        return nn.Sequential(*[nn.ReLU() for _ in range(n)])

    registry.add(Blocks=make_blocks)
    assert registry.get("MyNet") is MyNet and registry.get("Other") is _Hidden
    assert len(registry.build({"_target_": "Blocks", "n": 3})) == 3
    registry.add(MyNet)  # the same object again: fine
    registry.add(nn.Linear)
    with pytest.raises(RegistryError, match="'Linear' is taken by torch.nn.modules.linear.Linear"):
        registry.add(MyNet, name="Linear")
    registry.add(MyNet, name="Linear", override=True)
    assert registry.get("Linear") is MyNet
    with pytest.raises(RegistryError, match="'Adam' is taken by torch.optim.adam.Adam"):
        REGISTRY.add(MyNet, name="Adam")  # a built-in name of the global registry
    # the global registry: what configs use
    REGISTRY.add(make_blocks, name="ConfigTestBlocks")
    built = dl.SupervisedConfigRunner(
        config={"model": {"_target_": "ConfigTestBlocks", "n": 2}, "stages": {"s": {}}}
    ).get_model("s")
    assert isinstance(built, nn.Sequential) and len(built) == 2


def _runner(stage: dict, **top) -> dl.SupervisedConfigRunner:
    model = {"_target_": "Linear", "in_features": 4, "out_features": 2}
    return dl.SupervisedConfigRunner(config={"model": model, "stages": {"s": stage}, **top})


def test_config_errors_name_where_and_what():
    with pytest.raises(RegistryError) as error:
        _runner({"optimizer": {"_target_": "Adamm"}}).get_optimizer("s", nn.Linear(2, 2))
    message = str(error.value)
    assert "stages.s.optimizer" in message and "'Adamm'" in message
    assert "did you mean 'Adam'" in message and "REGISTRY.add" in message
    with pytest.raises(ConfigError, match=r"model: .*Linear does not take .*out_feature"):
        dl.SupervisedConfigRunner(
            config={
                "model": {"_target_": "Linear", "in_features": 1, "out_feature": 2},
                "stages": {"s": {}},
            }
        ).get_model("s")
    with pytest.raises(ConfigError, match=r"stages.s: unknown keys \['optimiser'\]"):
        _runner({"optimiser": {"_target_": "SGD"}})
    with pytest.raises(ConfigError, match=r"args: unknown keys \['verbos'\]"):
        _runner({}, args={"verbos": True})
    with pytest.raises(ConfigError, match="num_epochs must be an int >= 1"):
        _runner({"num_epochs": 0})
    with pytest.raises(ConfigError, match="needs 'stages'"):
        dl.ConfigRunner(config={"model": {}})
    with pytest.raises(ConfigError, match="has no 'datasets'.*override get_datasets"):
        _runner({"loaders": {"batch_size": 2}}).get_loaders("s")
    with pytest.raises(ConfigError, match=r"unknown keys \['batchsize'\]"):
        _runner({"loaders": {"batchsize": 2}}).get_loaders("s")
    runner = _runner({"optimizer": {"_target_": "SGD", "lr": 0.1}})
    with pytest.raises(ConfigError, match=r"model is a dict \(\['a', 'b'\]\).*_model"):
        runner.get_optimizer("s", {"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)})
    with pytest.raises(ConfigError, match="a scheduler needs an optimizer"):
        _runner({"scheduler": {"_target_": "StepLR", "step_size": 1}}).get_scheduler("s", None)
    with pytest.raises(dl.RunnerError, match=r"call run\(\)"):
        _runner({}).train(model=nn.Linear(1, 1))


def test_optimizer_options_dict_models_and_schedulers():
    """_model picks models of a dict; layerwise_params, no_bias_weight_decay and
    lr_linear_scaling as Catalyst; one param group per set of options; _optimizer picks the
    optimizer of a scheduler."""
    model = {"enc": nn.Linear(3, 4), "head": nn.Linear(4, 2)}
    runner = _runner(
        {
            "loaders": {"batch_size": 64, "datasets": {}},
            "optimizer": {
                "enc": {
                    "_target_": "SGD",
                    "_model": "enc",
                    "lr_linear_scaling": {"lr": 0.1, "base_batch_size": 32},
                    "weight_decay": 0.01,
                },
                "all": {
                    "_target_": "AdamW",
                    "_model": ["enc", "head"],
                    "lr": 1e-3,
                    "no_bias_weight_decay": False,
                    "layerwise_params": {"weight": {"lr": 5e-4}},
                },
            },
            "scheduler": {
                "enc": {"_target_": "StepLR", "_optimizer": "enc", "step_size": 1},
                "all": {"_target_": "ExponentialLR", "_optimizer": "all", "gamma": 0.9},
            },
        }
    )
    optimizer = runner.get_optimizer("s", model)
    enc, both = optimizer["enc"], optimizer["all"]
    assert [g["lr"] for g in enc.param_groups] == pytest.approx([0.2, 0.2])  # 0.1 * 64 / 32
    assert [g["weight_decay"] for g in enc.param_groups] == [0.01, 0.0]  # bias: none
    assert [len(g["params"]) for g in both.param_groups] == [2, 2]  # weights, biases
    assert [g["lr"] for g in both.param_groups] == pytest.approx([5e-4, 1e-3])
    assert both.param_groups[0]["params"][0] is model["enc"].weight
    scheduler = runner.get_scheduler("s", optimizer)
    assert scheduler["enc"].optimizer is enc and scheduler["all"].optimizer is both
    assert isinstance(scheduler["all"], torch.optim.lr_scheduler.ExponentialLR)
