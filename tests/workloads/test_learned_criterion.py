"""Criteria with trainable parameters under DDP (issue 10, item 5): averaged gradients, identical
on every rank, equal to one process, saved and resumed with the run."""

from __future__ import annotations

import json

import pytest
import torch

from ddprun.utils import load_checkpoint
from tests.workloads.helpers import ddprun, run, script

pytestmark = pytest.mark.timeout(240)


def _states(folder, rank=0):
    return json.loads((folder / f"states_rank{rank}.json").read_text())


def _close(a, b, tol):
    for part in ("model", "criterion"):
        for key in a[part]:
            diff = (torch.tensor(a[part][key]) - torch.tensor(b[part][key])).abs().max()
            assert float(diff) <= tol, (part, key, float(diff))


@pytest.mark.parametrize("accumulate", ["1", "2"])
def test_learned_criterion_stays_identical_across_ranks_and_matches_one_process(
    tmp_path, accumulate
):
    single, multi = tmp_path / "single", tmp_path / "multi"
    acc = ["--accumulate", accumulate]
    done = run(script("learned_loss", "--out", str(single), *acc), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    argv = ddprun(2, "learned_loss", "--out", str(multi), "--ddp", "--batch-size", "8", *acc)
    done = run(argv, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0, rank1 = _states(multi, 0), _states(multi, 1)
    assert rank0 == rank1  # bit for bit: the criterion's gradients were averaged
    _close(_states(single), rank0, tol=1e-5)
    # the criterion really learned (its temperature moved away from its start)
    assert abs(rank0["criterion"]["log_temperature"]) > 0.1


def test_learned_criterion_is_saved_and_resumed(tmp_path):
    full, part, logdir = tmp_path / "full", tmp_path / "part", tmp_path / "logs"
    argv = ddprun(2, "learned_loss", "--out", str(full), "--ddp", "--batch-size", "8")
    assert run(argv, cwd=tmp_path, timeout=180).returncode == 0
    first = ["--ddp", "--batch-size", "8", "--logdir", str(logdir), "--epochs", "1"]
    done = run(ddprun(2, "learned_loss", "--out", str(part), *first), cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = load_checkpoint(logdir / "checkpoints" / "last.pth")["criterion_state_dict"]
    assert set(saved) == {"log_temperature", "head.weight", "head.bias"}  # no "module." prefix
    assert torch.equal(
        saved["log_temperature"], torch.tensor(_states(part)["criterion"]["log_temperature"])
    )
    resume = [*first[:-1], "2", "--resume", str(logdir / "checkpoints" / "last.pth")]
    done = run(ddprun(2, "learned_loss", "--out", str(part), *resume), cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _states(part, 0) == _states(full, 0)
    assert _states(part, 1) == _states(full, 0)
