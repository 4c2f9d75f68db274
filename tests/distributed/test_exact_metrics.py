"""Distributed results equal single-process results (issue 3: exactness), real gloo processes."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.conftest import (
    assert_metrics_close,
    load_metrics,
    load_weights,
    run,
    script,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: train (batch 64) then validate; and validation of the untrained model."""
    folder = tmp_path_factory.mktemp("single")
    trained = run(script("exact_metrics", "--out", str(folder / "trained")), folder)
    assert trained.returncode == 0, trained.stderr[-3000:]
    untrained = run(script("exact_metrics", "--out", str(folder / "eval"), "--no-train"), folder)
    assert untrained.returncode == 0, untrained.stderr[-3000:]
    return folder


def test_spawn_two_ranks_train_like_one_process(single, tmp_path):
    """python script.py with a DDP engine: 2 ranks x batch 32 == 1 process x batch 64."""
    result = run(
        script(
            "exact_metrics",
            "--out",
            str(tmp_path),
            "--engine",
            "ddp",
            "--world-size",
            "2",
            "--batch-size",
            "32",
        ),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_metrics(single / "trained")
    got = load_metrics(tmp_path)
    assert got["world_size"] == 2
    assert_metrics_close(expected, got, ("train", "valid"), tol=1e-5)
    assert got["global_sample_step"] == expected["global_sample_step"] == 2048
    rank0, rank1 = (
        load_weights(tmp_path / "weights_rank0.json"),
        load_weights(tmp_path / "weights_rank1.json"),
    )
    reference = load_weights(single / "trained" / "weights_rank0.json")
    for name, tensor in reference.items():
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        assert torch.allclose(rank0[name], tensor, atol=1e-5), f"{name} differs from one process"


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_metrics_exact_on_uneven_split(single, tmp_path, world_size):
    """1001 validation samples over 2 and 3 ranks: every metric equals one process to 1e-6."""
    result = run(
        script(
            "exact_metrics",
            "--out",
            str(tmp_path),
            "--engine",
            "ddp",
            "--world-size",
            str(world_size),
            "--no-train",
        ),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = load_metrics(single / "eval"), load_metrics(tmp_path)
    assert got["world_size"] == world_size
    assert_metrics_close(expected, got, ("valid",))
    assert got["matrix"] == expected["matrix"]
    assert sum(map(sum, got["matrix"])) == 1001
    for key in (
        "loss",
        "logit_mean",
        "accuracy01",
        "f1/_macro",
        "precision/class_04",
        "support/class_03",
    ):
        assert key in got["epoch_metrics"]["valid"]
