"""Pieces of the FSDP engine that need no process group: publishing checkpoint folders, the
optimizer state layouts, the sharding policy, rebinding optimizers, engine options."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from ddprun import checkpoint_folders as folders
from ddprun import dl
from ddprun.engines import fsdp_modules
from ddprun.engines.factory import default_engine


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "data").write_text(text)
    return path


def test_publish_replaces_a_folder_and_leaves_no_temporary(tmp_path):
    target = _folder(tmp_path / "last", "old")
    folders.publish(_folder(folders.temp_folder(target), "new"), target)
    assert (target / "data").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["last"]
    folders.publish(_folder(folders.temp_folder(tmp_path / "best"), "first"), tmp_path / "best")
    assert (tmp_path / "best" / "data").read_text() == "first"


def test_copy_folder_hard_links_and_survives_a_later_publish(tmp_path):
    last = _folder(tmp_path / "last", "epoch 1")
    folders.copy_folder(last, tmp_path / "best")
    assert os.stat(last / "data").st_ino == os.stat(tmp_path / "best" / "data").st_ino
    folders.publish(_folder(folders.temp_folder(last), "epoch 2"), last)
    assert (tmp_path / "best" / "data").read_text() == "epoch 1"  # files are never rewritten


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    stale = _folder(folders.temp_folder(tmp_path / "last"), "partial")
    other = _folder(folders.temp_folder(tmp_path / "best"), "partial")
    folders.remove_stale_temps(tmp_path / "last")
    assert not stale.exists() and other.exists()


def test_a_folder_without_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(folders.CheckpointError, match="not a sharded checkpoint folder"):
        folders.consolidate(_folder(tmp_path / "last", "x"))


def test_optimizer_state_layouts_round_trip():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    optimizer = torch.optim.Adam(
        [{"params": [model[1].weight]}, {"params": [model[0].weight, model[0].bias]}], lr=0.1
    )
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    numbered = optimizer.state_dict()
    order = ["1.weight", "0.weight", "0.bias"]
    named = folders.optimizer_to_names(numbered, order)
    assert [g["params"] for g in named["param_groups"]] == [["1.weight"], ["0.weight", "0.bias"]]
    assert set(named["state"]) == set(order)
    back = folders.optimizer_to_numbers(named)
    assert back["param_groups"] == numbered["param_groups"]
    for index, values in numbered["state"].items():
        assert all(torch.equal(back["state"][index][n], v) for n, v in values.items())
    optimizer.load_state_dict(back)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), Block(), nn.ReLU(), Block(), nn.Linear(2, 1))


def test_default_policy_shards_each_child_holding_parameters():
    net = _net()
    assert fsdp_modules.units(net, None) == [net[4], net[3], net[1]]


def test_policy_by_class_or_function_innermost_first():
    net = _net()
    by_class = fsdp_modules.units(net, (Block, nn.Linear))
    assert by_class.index(net[1].inner) < by_class.index(net[1])  # inside before outside
    assert set(map(id, by_class)) == {
        id(m) for m in net.modules() if isinstance(m, (Block, nn.Linear))
    }
    assert fsdp_modules.units(net, lambda m: isinstance(m, nn.LayerNorm)) == [
        net[3].norm,
        net[1].norm,
    ]
    with pytest.raises(TypeError, match="wrap must be"):
        fsdp_modules.units(net, "Block")


def test_rebind_points_an_optimizer_at_replacement_parameters():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mapping = fsdp_modules.ParameterMap()
    old = mapping.before(model)
    model.weight = nn.Parameter(model.weight.detach().clone())  # what sharding does
    mapping.after(model, old)
    mapping.rebind({"only": optimizer})
    assert optimizer.param_groups[0]["params"][0] is model.weight
    assert optimizer.param_groups[0]["params"][1] is model.bias
    assert pickle.loads(pickle.dumps(mapping))._map == {}


def test_engine_options_and_the_default_engine():
    engine = dl.FSDPEngine(param_dtype="bf16", reduce_dtype="fp32", world_size=2)
    assert (engine.param_dtype, engine.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert engine.precision.name == "bf16" and engine.is_ddp and engine.is_sharded
    assert engine.checkpoint_path("ck", "last") == Path("ck/last")
    assert dl.DeviceEngine("cpu").checkpoint_path("ck", "last") == Path("ck/last.pth")
    assert pickle.loads(pickle.dumps(engine)).param_dtype == torch.bfloat16
    assert isinstance(default_engine(fsdp=True), dl.FullyShardedDataParallelEngine)
    assert default_engine(fsdp=True, amp=True).param_dtype == torch.bfloat16  # CPU
    with pytest.raises(ValueError, match="gather_on_end=False"):
        dl.FSDPEngine(gather_on_end=False).spawn(None)
