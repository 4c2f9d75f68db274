"""The seeds' distributed finetuning script with ``dl.FSDPEngine()`` in place of the DDP engine
(through ``ddprun --nproc 2``), and ``Runner.train(fsdp=True, amp=True)`` under plain python,
where the engine spawns its workers."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from ddprun.checkpoint import load_checkpoint

from .helpers import SCRIPTS, ddprun, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic_mnist import make_synthetic_mnist  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def _observed(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    data = json.loads((folder / "observed" / f"{tag}.json").read_text())
    return {key: torch.tensor(value) for key, value in data.items()}


def test_seed_finetuning_script_on_fsdp(tmp_path):
    make_synthetic_mnist(tmp_path, n_train=640, n_test=331, seed=0)
    result = run(ddprun(2, SCRIPTS / "seed_finetune_fsdp.py"), tmp_path, 200)
    assert result.returncode == 0, result.stdout[-4000:]
    folder = tmp_path / "logs" / "checkpoints"
    assert (folder / "best" / "__1_0.distcp").is_file() and not list(folder.glob("*.pth"))
    with open(tmp_path / "logs" / "logs" / "valid.csv") as handle:
        valid = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in valid] == [1, 2, 3, 4, 5, 6]
    best_epoch = 1 + min(range(3), key=lambda i: float(valid[i]["loss"]))
    best = load_checkpoint(folder / f"train_freezed.{best_epoch}")["model_state_dict"]
    first, second = (
        _observed(tmp_path, "train_freezed_start"),
        _observed(tmp_path, "train_unfreezed_start"),
    )
    end = _observed(tmp_path, "end")
    # stage 1 trains the head only: the frozen encoder (model[1]) is where it started
    for name in ("1.weight", "1.bias"):
        assert torch.equal(best[name], first[name]), name
    assert not torch.equal(best["3.weight"], first["3.weight"])
    # stage 2 starts from stage 1's best checkpoint (read back from its folder) ...
    assert first.keys() == second.keys() == best.keys()
    for name in best:
        assert torch.equal(second[name], best[name]), name
    # ... and, unfrozen, moves the encoder
    assert not torch.equal(end["1.weight"], second["1.weight"])
    assert "nothing to load at the start of a fresh run" in result.stdout


def test_train_fsdp_true_spawns_and_the_parent_gets_rank0_weights(tmp_path):
    logdir = tmp_path / "run"
    result = run([sys.executable, SCRIPTS / "spawn_train.py", logdir], tmp_path, 200)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "spawning 2 worker processes" in result.stdout
    parent = json.loads((logdir / "parent.json").read_text())
    assert parent["engine"].startswith("FullyShardedDataParallelEngine(")
    assert "precision=bf16" in parent["engine"]  # amp=True on CPU: bf16 parameters
    last = load_checkpoint(logdir / "checkpoints" / "last")["model_state_dict"]
    held = {key: torch.tensor(value) for key, value in parent["state"].items()}
    assert held.keys() == last.keys()
    for name, value in last.items():
        assert value.dtype == torch.float32  # fp32 master weights in the checkpoint
        assert torch.equal(held[name], value), name
    torch.manual_seed(0)  # the script's initial model: training moved it
    initial = torch.nn.Linear(8, 16)
    assert not torch.equal(held["0.weight"], initial.weight)
    predictions = torch.load(logdir / "predictions.pt")
    assert predictions.shape == (64, 4) and torch.isfinite(predictions).all()
