"""FSDP trains like DDP and one process, and writes sharded checkpoint folders that a plain
process reads back whole.

One configuration exercises everything at once: a dict of two models (encoder, head), the
encoder's first layer frozen, SGD with momentum, gradient accumulation over 3 batches, clipping
to a global norm of 0.05 (always active here), and each train loader left after batch 7, so an
accumulation window is still open at its end (the engine reduces it before the step). It runs
under ``ddprun --nproc 2`` with FSDPEngine and with DistributedDataParallelEngine (batch 16 per
rank), and in this process with DeviceEngine (batch 32); each run ends with ``evaluate_loader``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddprun import checkpoint_folders, utils
from ddprun.checkpoint import load_checkpoint
from ddprun.checkpoint_manifest import verify

from .helpers import (
    TRAIN,
    ddprun,
    flat_model_state,
    max_difference,
    metrics,
    run,
    run_all,
    weights,
)

pytestmark = pytest.mark.timeout(300)

CONFIG = ("--dict-model", "--freeze-first", "--sgd", "--accumulate", "3", "--clip", "0.05",
          "--leave-at", "7", "--epochs", "2", "--evaluate")  # fmt: skip


def _script():
    spec = importlib.util.spec_from_file_location("fsdp_train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fsdp_vs_ddp")
    found = {engine: folder / engine for engine in ("fsdp", "ddp")}
    commands = [
        (ddprun(2, TRAIN, "--engine", engine, "--logdir", logdir, *CONFIG), logdir)
        for engine, logdir in found.items()
    ]
    for result in run_all(commands, 200):  # both at once: half the wall time
        assert result.returncode == 0, result.stdout[-4000:]
    found["device"] = folder / "device"
    _script().main(["--engine", "device", "--logdir", str(found["device"]), *CONFIG])
    return found


def test_fsdp_weights_equal_ddp_and_one_process(runs):
    fsdp = weights(runs["fsdp"])
    assert max_difference(fsdp, weights(runs["ddp"])) <= 1e-5
    assert max_difference(fsdp, weights(runs["device"])) <= 1e-5


def test_fsdp_metrics_equal_ddp_and_one_process(runs):
    fsdp = metrics(runs["fsdp"])
    for other in ("ddp", "device"):
        expected = metrics(runs[other])
        assert fsdp.keys() == expected.keys() == {"train", "valid"}
        for loader, values in expected.items():
            assert fsdp[loader].keys() == values.keys()
            for key, value in values.items():
                assert fsdp[loader][key] == pytest.approx(value, abs=1e-5), (other, loader, key)


def test_the_model_after_train_is_plain_and_evaluates_again(runs):
    """``runner.model`` after an FSDP run holds the full weights (final_weights.json is its
    state dict); ``evaluate_loader`` shards it again and gets the last epoch's valid metrics."""
    evaluated = json.loads((runs["fsdp"] / "evaluated.json").read_text())
    assert evaluated == pytest.approx(metrics(runs["fsdp"])["valid"], abs=1e-7)


def test_frozen_layer_stays_and_the_rest_moves(runs):
    script = _script()
    initial = script.make_model(script.parse_args(["--logdir", "x", "--dict-model"]))
    final = weights(runs["fsdp"])
    assert torch.equal(final["encoder.0.weight"], initial["encoder"][0].weight)
    assert torch.equal(final["encoder.0.bias"], initial["encoder"][0].bias)
    assert not torch.equal(final["encoder.2.weight"], initial["encoder"][2].weight)
    assert not torch.equal(final["head.weight"], initial["head"].weight)


def test_checkpoints_are_folders_with_one_shard_per_rank(runs):
    folder = runs["fsdp"] / "run" / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["_metrics.json", "best", "last", "train.1", "train.2"]
    for name in ("best", "last", "train.1", "train.2"):
        files = sorted(p.name for p in (folder / name).iterdir())
        shards = [".metadata", "__0_0.distcp", "__1_0.distcp", "ddprun_state.pt"]
        assert files == [*shards, "manifest.json"]  # the manifest lists every file
        assert (folder / name / "__1_0.distcp").stat().st_size > 0  # rank 1 wrote its shard
        assert verify(folder / name) == []
    assert not list(folder.glob("*.pth")) and not list(folder.glob(".*.tmp"))
    records = utils.load_checkpoint(folder / "last")["checkpointer"]["checkpoints"]
    assert sorted(r["file"] for r in records) == ["train.1", "train.2"]


def test_a_plain_process_reads_a_folder_as_the_full_checkpoint(runs):
    assert not dist.is_initialized()  # no process group in this process
    folder = runs["fsdp"] / "run" / "checkpoints"
    state = load_checkpoint(folder / "last")
    ddp = load_checkpoint(runs["ddp"] / "run" / "checkpoints" / "last.pth")
    assert sorted(state) == sorted(ddp)
    model = flat_model_state(state["model_state_dict"])
    assert max_difference(model, weights(runs["fsdp"])) == 0.0
    assert all(t.dtype == torch.float32 and type(t) is torch.Tensor for t in model.values())
    for key in ("global_epoch_step", "global_batch_step", "global_sample_step", "stage_key"):
        assert state[key] == ddp[key], key
    assert state["metrics"].keys() == ddp["metrics"].keys()
    # optimizer: torch's numbered layout, the same momentum buffers as DDP's, loadable as is
    ours, theirs = state["optimizer_state_dict"], ddp["optimizer_state_dict"]
    assert [g["params"] for g in ours["param_groups"]] == [
        g["params"] for g in theirs["param_groups"]
    ]
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for index, values in theirs["state"].items():
        for name, value in values.items():
            assert torch.allclose(ours["state"][index][name], value, atol=1e-5), (index, name)
    script = _script()
    model = script.make_model(script.parse_args(["--logdir", "x", "--dict-model"]))
    optimizer = torch.optim.SGD([p for m in model.values() for p in m.parameters()], lr=0.1)
    utils.unpack_checkpoint(state, model=model, optimizer=optimizer)
    assert state["rng"].keys() == ddp["rng"].keys()


def test_convert_command_writes_one_checkpoint_file(runs, tmp_path, capsys):
    folder = runs["fsdp"] / "run" / "checkpoints" / "best"
    target = tmp_path / "best.pth"
    result = run([sys.executable, "-m", "ddprun.checkpoint_folders", folder, target], tmp_path, 60)
    assert result.returncode == 0, result.stdout
    assert f"wrote {target}" in result.stdout
    converted, direct = torch.load(target, weights_only=False), load_checkpoint(folder)
    assert sorted(converted) == sorted(direct)
    assert (
        max_difference(
            flat_model_state(converted["model_state_dict"]),
            flat_model_state(direct["model_state_dict"]),
        )
        == 0.0
    )
    with pytest.raises(SystemExit) as stop:  # the same command, in this process
        checkpoint_folders.main([str(tmp_path / "nope"), str(target)])
    assert stop.value.code == 2 and "not a sharded checkpoint folder" in capsys.readouterr().err


def test_one_process_resumes_from_a_sharded_folder(runs, tmp_path):
    """Epoch 1's folder, written by 2 FSDP ranks, resumes in one plain process (DeviceEngine,
    batch 32) and ends where the uninterrupted runs end."""
    source = runs["fsdp"] / "run" / "checkpoints" / "train.1"
    logdir = tmp_path / "resumed"
    _script().main(
        ["--engine", "device", "--logdir", str(logdir), *CONFIG, "--resume", str(source)]
    )
    assert max_difference(weights(logdir), weights(runs["fsdp"])) <= 1e-5
    assert load_checkpoint(logdir / "run" / "checkpoints" / "last.pth")["global_epoch_step"] == 2
