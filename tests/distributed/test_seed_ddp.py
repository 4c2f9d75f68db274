"""The user's distributed multistage seed (imports renamed, sampler line fixed) on CPU/gloo,
started both through `ddprun --nproc 2` and as `python script.py` (spawn mode)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from ddprun.checkpoint import load_checkpoint
from tests.distributed.conftest import SCRIPTS, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic_mnist import make_synthetic_mnist  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in json.loads(path.read_text()).items()}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


@pytest.mark.parametrize("mode", ["ddprun", "spawn"])
def test_seed_multistage_ddp(tmp_path, mode):
    make_synthetic_mnist(tmp_path, n_train=640, n_test=331, seed=0)
    observe = str(SCRIPTS / "observe_seed_ddp.py")
    if mode == "ddprun":
        argv = [sys.executable, "-m", "ddprun", "--nproc", "2", "--logdir", "runlogs", observe]
    else:
        argv = [sys.executable, observe]
    result = run(argv, tmp_path, timeout=200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    observed = tmp_path / "observed"

    # every rank ends with identical weights
    _assert_same(
        _weights(observed / "rank0_end.json"), _weights(observed / "rank1_end.json"), "end"
    )

    # stage 2 starts, on every rank, from stage 1's best checkpoint
    valid = _rows(tmp_path / "logs" / "logs" / "valid.csv")
    assert [int(r["step"]) for r in valid] == [1, 2, 3, 4, 5, 6]  # one row per epoch
    assert [int(r["step"]) for r in _rows(tmp_path / "logs" / "logs" / "train.csv")] == list(
        range(1, 7)
    )
    best_epoch = 1 + min(range(3), key=lambda i: float(valid[i]["loss"]))
    best = load_checkpoint(tmp_path / "logs" / "checkpoints" / f"train_freezed.{best_epoch}.pth")
    for rank in (0, 1):
        start = _weights(observed / f"rank{rank}_train_unfreezed_start.json")
        _assert_same(start, best["model_state_dict"], f"rank {rank} stage-2 start")
    # and stage 1 did start fresh: the same initial weights on both ranks
    _assert_same(
        _weights(observed / "rank0_train_freezed_start.json"),
        _weights(observed / "rank1_train_freezed_start.json"),
        "stage-1 start",
    )
    assert "nothing to load at the start of a fresh run" in result.stdout
    if mode == "ddprun":
        assert (tmp_path / "runlogs" / "ranks" / "rank1.log").is_file()
