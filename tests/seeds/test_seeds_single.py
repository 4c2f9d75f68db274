"""The user's single-process seed scripts, imports renamed, run on ddprun (acceptance of issue 2)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from ddprun.checkpoint import load_checkpoint
from tests.seeds.conftest import run_seed

pytestmark = pytest.mark.timeout(180)


def _valid_rows(logdir):
    with open(logdir / "logs" / "valid.csv") as handle:
        return list(csv.DictReader(handle))


def _assert_best_loaded(model, best_path):
    state = load_checkpoint(best_path)["model_state_dict"]
    modules = model if isinstance(model, dict) else {None: model}
    for key, module in modules.items():
        saved = state if key is None else state[key]
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, saved[name]), f"{key}.{name} differs from best.pth"


@pytest.mark.parametrize(
    "name",
    ["seed_custom_runner", "seed_multi_model", "seed_multi_optimizer", "seed_multi_criterion"],
)
def test_multi_component_seed(mnist_cwd, name):
    scope = run_seed(name)
    logdir = mnist_cwd / "logs"
    runner = scope["runner"]
    assert runner.global_epoch_step == 5
    rows = _valid_rows(logdir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert float(rows[-1]["accuracy01"]) > 0.8  # ten classes: chance is 0.1
    assert float(rows[-1]["accuracy03"]) >= float(rows[-1]["accuracy01"])
    checkpoints = logdir / "checkpoints"
    assert (checkpoints / "best.pth").is_file() and (checkpoints / "last.pth").is_file()
    metrics = json.loads((checkpoints / "_metrics.json").read_text())
    best_loss = min(float(r["loss"]) for r in rows)
    assert metrics["best"]["score"] == pytest.approx(best_loss, rel=1e-5)
    assert list((logdir / "tensorboard" / "valid").glob("events.out.tfevents.*"))
    _assert_best_loaded(scope["model"], checkpoints / "best.pth")


def test_multistage_seed(mnist_cwd):
    scope = run_seed("seed_multistage")
    runner = scope["runner"]
    assert runner.global_epoch_step == 6
    checkpoints = mnist_cwd / "logs" / "checkpoints"
    stage1 = [load_checkpoint(checkpoints / f"train_freezed.{e}.pth") for e in (1, 2, 3)]
    stage2_files = sorted(checkpoints.glob("train_unfreezed.*.pth"))
    assert 1 <= len(stage2_files) <= 3
    assert len(list(checkpoints.glob("train_freezed.*.pth"))) == 3
    frozen = [c["model_state_dict"]["1.weight"] for c in stage1]
    head = [c["model_state_dict"]["3.weight"] for c in stage1]
    assert all(torch.equal(frozen[0], w) for w in frozen), "frozen layer changed in stage 1"
    assert not torch.equal(head[0], head[2]), "the head must train in stage 1"
    final = runner.model[1].weight.detach()
    assert not torch.equal(final, frozen[0]), "layer 1 must train in stage 2"
    rows = _valid_rows(mnist_cwd / "logs")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[-1]["accuracy01"]) > 0.8
    assert (checkpoints / "best.pth").is_file() and (checkpoints / "last.pth").is_file()
    assert list((mnist_cwd / "logs" / "tensorboard" / "train").glob("events.out.tfevents.*"))
